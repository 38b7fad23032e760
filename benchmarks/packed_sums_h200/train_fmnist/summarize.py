"""Does the scan backward's channel-sum mode change training? vim_mini (N 16, bf16 autocast) retrained on
Fashion-MNIST for the recipe's 4 epochs with ``--scan-sums fixed | butterfly | packed`` and seeds 0 and 1, all six
runs side by side on one GPU:

    for mode in fixed butterfly packed; do for seed in 0 1; do
      python -m retrain.train -c configs/retrain/fashion_mnist.yaml --data-dir DATA --model vim_mini \\
        --scan-sums $mode --seed $seed --experiment ${mode}_s$seed > ${mode}_s$seed.log 2>&1 &
    done; done; wait

This script reads those logs (next to it) and writes ``summary.json``: per run the per-epoch train loss, test loss
and top-1, and per mode the final figures' mean and spread over the seeds.
"""

import json
import re
import statistics
from pathlib import Path

HERE = Path(__file__).parent
EPOCH = re.compile(r"epoch (\d+): train_loss ([\d.]+)\s+loss ([\d.]+)\s+top1 ([\d.]+)")


def main() -> None:
    runs = {}
    for log in sorted(HERE.glob("*_s*.log")):
        epochs = [dict(zip(("epoch", "train_loss", "loss", "top1"), (int(m[1]), *map(float, m.groups()[1:]))))
                  for m in EPOCH.finditer(log.read_text())]  # fmt: skip
        runs[log.stem] = epochs
    modes = {}
    for name, epochs in runs.items():
        modes.setdefault(name.rsplit("_s", 1)[0], []).append(epochs[-1])
    summary = {}
    print(f"{'mode':<10} {'top1 (seeds)':<16} {'mean':>6} {'test loss':>10} {'train loss':>10}")
    for mode, finals in modes.items():
        top1 = [f["top1"] for f in finals]
        summary[mode] = {"top1": top1, "top1_mean": statistics.mean(top1),
                         "loss_mean": statistics.mean(f["loss"] for f in finals),
                         "train_loss_mean": statistics.mean(f["train_loss"] for f in finals)}  # fmt: skip
        s = summary[mode]
        means = f"{s['top1_mean']:>6.2f} {s['loss_mean']:>10.4f} {s['train_loss_mean']:>10.4f}"
        print(f"{mode:<10} {str(top1):<16} {means}")
    (HERE / "summary.json").write_text(json.dumps({"model": "vim_mini", "runs": runs, "modes": summary}, indent=1))


if __name__ == "__main__":
    main()
