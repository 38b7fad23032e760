"""The bad-input catalogue: every case exits non-zero with one line on stderr and changes no file.

Each case runs a real CLI (``python -m retrain.train``, ``nas.search``, ``nas.vis_search_prob``, ``retrain.compare``,
``nas.tune``, ``search_spaces``) as its own process. To keep the file fast, one runner process pays the imports once
and forks a child per case (``cli_runner.py``; ``RELIABILITY_PLAIN_SUBPROCESS=1`` starts a fresh interpreter per case
instead). The line must say what is wrong (``expect``, a regex) and what to do; no traceback unless ``--debug``.
Each case works in its own folder (its cwd and ``--output``) next to shared input files; every file and folder is
fingerprinted (size, mtime, SHA-1) before and after: a case may create, change or remove nothing in either.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from reliability_testutils import cli_env, fingerprint, is_selected

from retrain.checkpoint import save_checkpoint

HERE = Path(__file__).resolve().parent
TRAIN = ["--model", "test_vim", "--img-size", "16", "--num-samples", "64", "--batch-size", "16", "--device", "cpu"]
SEARCH = ["--model", "test_local_vim_search", "--img-size", "16", "--num-samples", "64", "--batch-size", "16"]
SEARCH += ["--device", "cpu"]
TUNE = ["--target", "search", "-c", "{fx}/search_base.yaml"]


@dataclass(frozen=True)
class Case:
    id: str
    module: str
    argv: list[str]  # {fx} is the shared fixtures folder, {out} this case's own output folder
    expect: str  # regex the one stderr line must match (after "error: ")
    setup: tuple[str, ...] = field(default=())  # fixtures copied into {out} first (an existing run, say)


CASES = [
    # --- configuration: unknown key, wrong type, out-of-range value, unreadable file --------------------------------
    Case("config-unknown-flag", "retrain.train", [*TRAIN, "--epoch", "3"], r"unknown argument '--epoch'.*'--epochs'"),
    Case("config-unknown-yaml-key", "retrain.train", ["-c", "{fx}/unknown_key.yaml"], r"unknown key 'lr_rate'.*'lr'"),
    Case("config-wrong-type-yaml", "nas.search", ["-c", "{fx}/wrong_type.yaml"], r"'epochs' must be an integer"),
    Case("config-wrong-type-flag", "retrain.train", [*TRAIN, "--batch-size", "3.5"],
         r"--batch-size: invalid int value: '3.5'; see --help"),
    Case("config-out-of-range", "retrain.train", [*TRAIN, "--lr", "-1"], r"--lr -1.0 is out of range; use a value > 0"),
    Case("config-search-out-of-range", "nas.search", [*SEARCH, "--arch-frac", "1.5"], r"--arch-frac 1.5 .*\(0, 1\)"),
    Case("config-unknown-algo", "nas.search", [*SEARCH, "--algo", "dart"], r"--algo 'dart'.*one of darts"),
    Case("config-gdas-top-m-above-k", "nas.search", [*SEARCH, "--img-size", "32", "--algo", "gdas", "--gdas-top-m=9"],
         r"--gdas-top-m 9 is out of range; the space has 8 candidates per layer"),
    Case("config-missing-file", "retrain.train", ["-c", "{fx}/nope.yaml"], r"config file not found: .*nope.yaml"),
    Case("config-not-yaml", "nas.search", ["-c", "{fx}/broken.yaml"], r"broken.yaml: not valid YAML"),
    Case("config-unknown-model", "retrain.train", [*TRAIN, "--model", "test_vimm"], r"'test_vimm'; did you mean"),
    Case("config-not-a-supernet", "nas.search", [*SEARCH, "--model", "test_vim"], r"'test_vim' has no arch param"),
    Case("config-bad-nan-hook", "retrain.train", [*TRAIN, "--debug-nan-loss-at", "x"], r"must list integers >= 0"),
    Case("config-not-a-device", "retrain.train", [*TRAIN, "--device", "gpu"],
         r"--device 'gpu' is not a device; use auto, cuda, cpu or cuda:N"),
    Case("config-min-lr-negative", "nas.search", [*SEARCH, "--min-lr", "-1"],
         r"--min-lr -1.0 is out of range; use >= 0"),
    Case("config-seed-negative", "retrain.train", [*TRAIN, "--seed", "-1"],
         r"--seed -1 is out of range; use a value >= 0"),
    Case("config-mixup-prob-above-one", "retrain.train", [*TRAIN, "--mixup-prob", "2"],
         r"--mixup-prob 2.0 is out of range; use a value in \[0, 1\]"),
    Case("config-unknown-eval-metric", "retrain.train", [*TRAIN, "--eval-metric", "foo"],
         r"--eval-metric 'foo' is out of range; use one of top1, top5, loss$"),
    Case("config-search-unknown-model-kwarg", "nas.search", [*SEARCH, "--model-kwargs", "d_stat=4"],
         r"cannot build 'test_local_vim_search' with \{.*'d_stat': 4\}: .*unexpected keyword argument 'd_stat'; "
         r"did you mean 'd_state'\?$"),
    Case("config-model-kwargs-typo", "retrain.train", [*TRAIN, "--model-kwargs", "embed_dimm=8"],
         r"unexpected keyword argument 'embed_dimm'; did you mean 'embed_dim'\?$"),
    Case("config-model-kwargs-not-a-pair", "retrain.train", [*TRAIN, "--model-kwargs", "embed_dim"],
         r"--model-kwargs: expected KEY=VALUE, e.g. embed_dim=160, got 'embed_dim'; see --help$"),
    # --- data: missing path, wrong layout, empty ---------------------------------------------------------------------
    Case("data-missing-dir", "retrain.train", [*TRAIN, "--dataset", "mnist", "--data-dir", "{fx}/nowhere"],
         r"mnist: the data folder not found at .*nowhere; pass --data-dir"),
    Case("data-missing-npz", "retrain.train", [*TRAIN, "--dataset", "mnist", "--data-dir", "{fx}/x.npz"],
         r"mnist: the data file not found at .*x.npz; pass --data-dir"),
    Case("data-no-dir-given", "nas.search", [*SEARCH, "--dataset", "fashion_mnist"], r"needs --data-dir"),
    Case("data-unknown-dataset", "retrain.train", [*TRAIN, "--dataset", "cifar11"], r"'cifar11'; did you mean 'cif"),
    Case("data-npz-wrong-keys", "retrain.train", [*TRAIN, "--dataset", "mnist", "--data-dir", "{fx}/wrong_keys.npz"],
         r"lacks arrays \['x_train', 'y_train'\]"),
    Case("data-npz-empty", "nas.search", [*SEARCH, "--dataset", "mnist", "--data-dir", "{fx}/empty.npz"],
         r"mnist: 0 train images but 0 labels in .*empty.npz; check"),
    Case("data-npz-truncated", "retrain.train", [*TRAIN, "--dataset", "mnist", "--data-dir", "{fx}/truncated.npz"],
         r"truncated.npz is not a readable .npz archive.*numpy.savez"),
    Case("data-npz-not-an-archive", "nas.search", [*SEARCH, "--dataset", "mnist", "--data-dir", "{fx}/text.npz"],
         r"text.npz is not a readable .npz archive \(not a zip archive"),
    Case("config-model-kwargs-classes", "retrain.train", [*TRAIN, "--model-kwargs", "num_classes=7"],
         r"--model-kwargs num_classes=7: num_classes is set by the trainer; the trainer takes it from the dataset"),
    Case("config-model-kwargs-size", "nas.search", [*SEARCH, "--model-kwargs", "img_size=32"],
         r"--model-kwargs img_size=32: img_size is set by the trainer; use --img-size instead"),
    Case("config-arch-warmup-whole-run", "nas.search", [*SEARCH, "--epochs", "1"],
         r"--arch-warmup-epochs 1 is out of range; use >= 0 and below --epochs 1"),
    Case("data-idx-corrupt", "retrain.train", [*TRAIN, "--dataset", "mnist", "--data-dir", "{fx}/idx_corrupt"],
         r"not an IDX file"),
    Case("data-imagefolder-no-train", "retrain.train", [*TRAIN, "--dataset", "imagefolder", "--data-dir", "{fx}"],
         r"the 'train/' folder .*ImageNet layout"),
    Case("data-imagefolder-empty", "retrain.train",
         [*TRAIN, "--dataset", "imagefolder", "--data-dir", "{fx}/empty_folder"],
         r"no images under .*one folder per class"),
    Case("data-fewer-samples-than-batch", "retrain.train", [*TRAIN, "--num-samples", "8"],
         r"batch_size 16 is larger than the 8 samples"),
    # --- sizes --------------------------------------------------------------------------------------------------------
    Case("size-image-too-small", "retrain.train", [*TRAIN, "--img-size", "2"], r"img_size must be an integer >= 4"),
    Case("size-image-not-multiple-of-patch", "retrain.train", [*TRAIN, "--img-size", "18", "--patch-size", "4"],
         r"18.*patch.*4"),
    Case("size-patch-larger-than-image", "nas.search", [*SEARCH, "--patch-size", "32"],
         r"img_size \(16, 16\) is not divisible by patch_size 32"),
    # --- arch files ---------------------------------------------------------------------------------------------------
    Case("arch-binary-file", "retrain.train", [*TRAIN, "--arch", "{fx}/binary.pt"],
         r"arch file .*binary.pt: not a text file \(a checkpoint or an image\?\); pass the arch YAML"),
    Case("space-binary-file", "nas.search", [*SEARCH, "--space", "{fx}/binary.pt"],
         r"search space file .*binary.pt: not a text file; pass a search space YAML"),
    Case("config-binary-file", "retrain.train", ["-c", "{fx}/binary.pt"],
         r"config file .*binary.pt: not a text file; pass a YAML file to -c/--config"),
    Case("sweep-space-binary-file", "nas.tune", [*TUNE, "--space", "{fx}/binary.pt"],
         r"sweep space .*binary.pt: not a text file; pass a sweep space YAML to --space"),
    Case("arch-wrong-layer-count", "retrain.train", [*TRAIN, "--arch", "{fx}/arch_3layers.yaml"],
         r"3 layers.*2 searchable layers"),
    Case("arch-unknown-order", "retrain.train", [*TRAIN, "--arch", "{fx}/arch_bad_order.yaml"], r"zigzag"),
    Case("arch-unknown-model", "retrain.train", [*TRAIN, "--arch", "{fx}/arch_unknown_model.yaml"],
         r"arch file .*arch_unknown_model.yaml: unknown model 'test_local_vimm'; did you mean 'test_local_vim'\? fix"),
    Case("arch-timm-model", "retrain.train", [*TRAIN, "--arch", "{fx}/arch_timm_model.yaml"],
         r"'vit_tiny_patch16_224' is timm's own model, which takes no arch"),
    Case("config-unknown-optimizer", "retrain.train", [*TRAIN, "--opt", "adamx"],
         r"--opt 'adamx' is not a timm optimizer; did you mean 'adamax'"),
    Case("config-unknown-schedule", "nas.search", [*SEARCH, "--sched", "cosin"],
         r"--sched 'cosin' is not a timm LR schedule; did you mean 'cosine'"),
    Case("arch-orders-of-another-space", "retrain.train", [*TRAIN, "--arch", "{fx}/arch_other_space.yaml"],
         r"order 'v' is not a candidate of search space 'vim'"),
    Case("arch-unknown-space", "retrain.train", [*TRAIN, "--arch", "{fx}/arch_unknown_space.yaml"],
         r"unknown search space 'vmamba_scans'; did you mean 'vmamba'"),
    Case("arch-wrong-k", "retrain.train", [*TRAIN, "--arch", "{fx}/arch_wrong_k.yaml"], r"2 orders chosen .* k=4"),
    Case("arch-unknown-version", "retrain.train", [*TRAIN, "--arch", "{fx}/arch_v99.yaml"], r"99"),
    Case("arch-missing", "retrain.train", [*TRAIN, "--arch", "{fx}/nope_arch.yaml"], r"arch file not found"),
    # --- checkpoints --------------------------------------------------------------------------------------------------
    Case("ckpt-resume-missing", "retrain.train", [*TRAIN, "--resume", "{fx}/nope.pt"], r"checkpoint not found"),
    Case("ckpt-resume-truncated", "nas.search", [*SEARCH, "--resume", "{fx}/truncated.pt"],
         r"truncated, corrupt .*--resume auto"),
    Case("ckpt-eval-truncated", "retrain.train", ["--eval-only", "{fx}/truncated.pt"],
         r"truncated, corrupt or not a plain-tensor checkpoint \((RuntimeError|OSError): [^.;]*\); use another "
         r"checkpoint of the run"),
    Case("ckpt-resume-foreign", "retrain.train", [*TRAIN, "--resume", "{fx}/timm_weights.pt"],
         r"not a scan-nas checkpoint"),
    Case("ckpt-resume-other-model", "retrain.train", [*TRAIN, "--resume", "{fx}/other_model.pt"],
         r"holds model 'test_vit', not 'test_vim'"),
    Case("ckpt-eval-only-search-ckpt", "retrain.train", ["--eval-only", "{fx}/search_kind.pt"],
         r"'search' checkpoint, expected 'retrain'"),
    Case("ckpt-auto-only-truncated", "nas.search",
         [*SEARCH, "--experiment", "run", "--resume", "auto"], r"no complete checkpoint", setup=("truncated_run",)),
    Case("ckpt-resume-other-size", "retrain.train",
         [*TRAIN, "--experiment", "run", "--resume", "{out}/runs/run/last.pt"],
         r"was built with img_size=32, but this run asks for img_size=16; resume with the run's own settings",
         setup=("run_at_32px",)),
    Case("ckpt-resume-other-default", "retrain.train",
         [*TRAIN, "--experiment", "run", "--resume", "{out}/runs/run/last.pt"],
         r"was built with d_state=8, but this run asks for d_state=4; resume with the run's own settings",
         setup=("run_other_default",)),
    Case("ckpt-search-resume-other-kwargs", "nas.search",
         [*SEARCH, "--img-size", "32", "--experiment", "run", "--resume", "{out}/runs/run/last.pt",
          "--model-kwargs", "embed_dim=48"],
         r"was built with embed_dim=\(unset\), but this run asks for embed_dim=48",
         setup=("search_run",)),
    Case("ckpt-resume-other-epochs", "retrain.train",
         [*TRAIN, "--experiment", "run", "--resume", "{out}/runs/run/last.pt", "--epochs", "5", "--lr", "1e-3"],
         r"was trained with --epochs 2, but this run asks for --epochs 5; its LR schedule.* start a new --experiment",
         setup=("run_2_epochs",)),
    Case("ckpt-resume-other-optimizer", "retrain.train",
         [*TRAIN, "--experiment", "run", "--resume", "{out}/runs/run/last.pt", "--opt", "sgd"],
         r"was trained with --opt 'adamw', but this run asks for --opt 'sgd'; its LR schedule, optimizer state",
         setup=("run_adamw",)),
    Case("ckpt-resume-other-steps-per-epoch", "nas.search",
         [*SEARCH, "--img-size", "32", "--experiment", "run", "--resume", "{out}/runs/run/last.pt"],
         r"was saved at 8 steps per epoch \(128 weight-set images\), but this run takes 2 \(32 weight-set images\); "
         r"its "
         r"position in the epoch and its per-step LR schedule count in the former",
         setup=("search_8_steps",)),
    Case("run-files-not-clobbered", "nas.search", [*SEARCH, "--experiment", "run"],
         r"holds another run's args.yaml, summary.csv but no checkpoint; pass --resume auto", setup=("files_run",)),
    Case("ckpt-existing-run-not-clobbered", "retrain.train", [*TRAIN, "--experiment", "run"],
         r"already holds checkpoints; pass --resume auto", setup=("existing_run",)),
    Case("ckpt-resume-path-over-another-run", "retrain.train",
         [*TRAIN, "--experiment", "run", "--resume", "{fx}/other_model.pt"],
         r"runs/run holds another run \(last.pt\); resuming .*other_model.pt there would write over it: choose a new "
         r"--experiment", setup=("existing_run",)),
    Case("ckpt-search-resume-path-over-run-files", "nas.search",
         [*SEARCH, "--experiment", "run", "--resume", "{fx}/other_model.pt"],
         r"holds another run \(args.yaml, summary.csv\); resuming", setup=("files_run",)),
    Case("derive-missing-source", "nas.vis_search_prob", ["{fx}/no_run"], r"not found: .*no_run"),
    Case("derive-truncated", "nas.vis_search_prob", ["{fx}/truncated.pt"], r"truncated or corrupt .*no other"),
    Case("derive-retrain-ckpt", "nas.vis_search_prob", ["{fx}/other_model.pt"],
         r"'retrain' checkpoint, expected 'search' \(nas.search writes those\)$"),
    Case("derive-out-exists", "nas.vis_search_prob", ["{fx}/probs_run", "--out", "{fx}/arch_2layers.yaml"],
         r"exists; choose another --out or pass --overwrite"),
    Case("derive-no-args", "nas.vis_search_prob", [], r"required: RUN_DIR_OR_CHECKPOINT; see .* --help"),
    # --- sweep spaces, comparisons, orders --------------------------------------------------------------------------
    Case("sweep-space-missing", "nas.tune", [*TUNE, "--space", "{fx}/nope_space.yaml"],
         r"sweep space file not found"),
    Case("sweep-unknown-param", "nas.tune", [*TUNE, "--space", "{fx}/space_unknown.yaml"],
         r"'arch_lrr' is not a config key.*'arch_lr'"),
    Case("sweep-unknown-distribution", "nas.tune",
         [*TUNE, "--space", "{fx}/space_bad_dist.yaml"], r"unknown distribution 'logunif"),
    Case("sweep-low-above-high", "nas.tune", [*TUNE, "--space", "{fx}/space_low_high.yaml"],
         r"low \(0.1\) must be below high \(0.01\)"),
    Case("sweep-value-a-trial-refuses", "nas.tune", [*TUNE, "--space", "{fx}/space_bad_choice.yaml"],
         r"space_bad_choice.yaml: params.algo can be 'dart', which a trial refuses: --algo 'dart' is out of range"),
    Case("sweep-range-a-trial-refuses", "nas.tune", [*TUNE, "--space", "{fx}/space_warmup_range.yaml"],
         r"params.arch_warmup_epochs can be 3, which a trial refuses: --arch-warmup-epochs 3 is out of range"),
    Case("sweep-grace-above-max-t", "nas.tune", [*TUNE, "--space", "{fx}/space_grace2.yaml"],
         r"asha.grace_period 2 is longer than the longest trial \(1 epoch\(s\), ASHA's max_t\); lower grace_period"),
    Case("sweep-base-refused-by-itself", "nas.tune", ["--target", "search", "-c", "{fx}/search_base_warmup.yaml",
                                                      "--space", "{fx}/space_lr.yaml"],
         r"search_base_warmup.yaml: every trial would refuse it: --arch-warmup-epochs 1 is out of range"),
    Case("sweep-no-config", "nas.tune", ["--target", "search", "--space", "{fx}/space_unknown.yaml"],
         r"base config with -c"),
    Case("sweep-bad-target", "nas.tune", ["--target", "nope", "-c", "{fx}/search_base.yaml"],
         r"invalid choice: 'nope'.*see python -m nas.tune --help"),
    Case("compare-unknown-key", "retrain.compare", ["-c", "{fx}/compare_bad.yaml"], r"unknown key 'modle'"),
    Case("compare-jobs-zero", "retrain.compare", ["-c", "{fx}/compare_ok.yaml", "--jobs", "0"],
         r"--jobs 0 is out of range; use a value >= 1"),
    Case("compare-model-kwargs-owned", "retrain.compare", ["-c", "{fx}/compare_owned.yaml"],
         r"row 'vim': --model-kwargs patch_size=2: patch_size is set by the trainer; use --patch-size instead"),
    Case("sweep-base-model-kwargs-owned", "nas.tune", ["--target", "search", "-c", "{fx}/search_base_owned.yaml",
                                                      "--space", "{fx}/space_unknown.yaml"],
         r"search_base_owned.yaml: --model-kwargs in_chans=1: in_chans is set by the trainer; use --in-chans"),
    Case("sweep-base-size-not-fitting", "nas.tune", ["--target", "retrain", "-c", "{fx}/retrain_base_18.yaml",
                                                     "--space", "{fx}/space_lr.yaml"],
         r"retrain_base_18.yaml: every trial would fail: test_vim: img_size \(18, 18\) is not divisible by patch_size"),
    Case("sweep-base-data-missing", "nas.tune", ["--target", "retrain", "-c", "{fx}/retrain_base_nodata.yaml",
                                                 "--space", "{fx}/space_lr.yaml"],
         r"retrain_base_nodata.yaml: every trial would fail: fashion_mnist: .*nowhere"),
    Case("orders-unknown-order", "search_spaces", ["show", "zigzag"], r"zigzag"),
    Case("orders-grid-too-large", "search_spaces", ["show", "wv3", "--size", "100000x100000"],
         r"size '100000x100000' is too large to print \(at most 512 per side\)"),
]  # fmt: skip

# Not errors, by design: windows larger than the grid are clipped (a 2x2 token grid with w7 is a valid order).
ACCEPTED = [
    Case("size-window-larger-than-grid", "retrain.train",
         [*TRAIN, "--img-size", "8", "--patch-size", "4", "--num-samples", "32", "--epochs", "1",
          "--arch", "{fx}/arch_w7.yaml"], ""),
    Case("orders-window-larger-than-grid", "search_spaces", ["show", "w7", "--size", "2x3"], ""),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: the bad (and a few good) inputs, written once


def _arch(path: Path, **changes) -> None:
    arch = {
        "format_version": 1,
        "model": "test_local_vim",
        "space": "localmamba",
        "layers": [{"label": f"blocks.{i}", "orders": ["h", "h_flip", "w2", "w2_flip"]} for i in range(2)],
    }
    arch.update(changes)
    path.write_text(yaml.safe_dump(arch))


def _make_fixtures(fx: Path) -> None:
    fx.mkdir(parents=True)
    (fx / "unknown_key.yaml").write_text("model: test_vim\nlr_rate: 0.1\n")
    (fx / "binary.pt").write_bytes(b"PK\x03\x04\x80\x81\xfe\xff" * 16)  # what a checkpoint or image starts like
    (fx / "wrong_type.yaml").write_text("epochs: ten\n")
    (fx / "broken.yaml").write_text("epochs: [1, 2\n")
    (fx / "search_base.yaml").write_text(
        yaml.safe_dump({"model": "test_local_vim_search", "epochs": 1, "arch_warmup_epochs": 0})
    )
    np.savez(fx / "wrong_keys.npz", images=np.zeros((4, 28, 28), np.uint8))
    np.savez(
        fx / "empty.npz",
        x_train=np.zeros((0, 28, 28), np.uint8),
        y_train=np.zeros((0,), np.uint8),
        x_test=np.zeros((0, 28, 28), np.uint8),
        y_test=np.zeros((0,), np.uint8),
    )
    (fx / "idx_corrupt").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (fx / "idx_corrupt" / name).write_bytes(gzip.compress(b"this is no IDX file"))
    (fx / "truncated.npz").write_bytes((fx / "wrong_keys.npz").read_bytes()[:100])
    (fx / "text.npz").write_text("x_train,y_train\n")
    (fx / "empty_folder" / "train" / "cat").mkdir(parents=True)
    (fx / "empty_folder" / "val" / "cat").mkdir(parents=True)
    _arch(fx / "arch_2layers.yaml")
    _arch(
        fx / "arch_3layers.yaml",
        layers=[{"label": f"blocks.{i}", "orders": ["h", "h_flip", "w2", "w2_flip"]} for i in range(3)],
    )
    _arch(fx / "arch_bad_order.yaml", layers=[{"label": f"blocks.{i}", "orders": ["h", "zigzag"]} for i in range(2)])
    _arch(fx / "arch_unknown_model.yaml", model="test_local_vimm")
    _arch(fx / "arch_timm_model.yaml", model="vit_tiny_patch16_224")
    _arch(
        fx / "arch_other_space.yaml",
        space="vim",
        layers=[{"label": f"blocks.{i}", "orders": ["h", "v"]} for i in range(2)],
    )
    _arch(fx / "arch_unknown_space.yaml", space="vmamba_scans")
    _arch(
        fx / "arch_w7.yaml", layers=[{"label": f"blocks.{i}", "orders": ["h", "v", "w7", "w7_flip"]} for i in range(2)]
    )
    _arch(fx / "arch_wrong_k.yaml", layers=[{"label": f"blocks.{i}", "orders": ["h", "v"]} for i in range(2)])
    _arch(fx / "arch_v99.yaml", format_version=99)

    save_checkpoint({"kind": "retrain", "model": "test_vit", "step": 0, "epoch": 0}, fx / "other_model.pt")
    save_checkpoint({"kind": "search", "model": "test_local_vim_search", "step": 0, "epoch": 0}, fx / "search_kind.pt")
    full = fx / "full.pt"
    save_checkpoint({"kind": "search", "model": "test_local_vim_search", "w": torch.randn(4096)}, full)
    (fx / "truncated.pt").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    torch.save({"patch_embed.proj.weight": torch.randn(8, 3, 4, 4)}, fx / "timm_weights.pt")
    (fx / "probs_run").mkdir()
    orders = ["h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip"]  # the localmamba space
    record = {"epoch": 0, "labels": ["blocks.0", "blocks.1"], "candidates": orders, "probs": [[0.125] * 8] * 2}
    (fx / "probs_run" / "arch_probs.jsonl").write_text(json.dumps(record) + "\n")

    runs = fx / "setups"
    (runs / "truncated_run" / "runs" / "run").mkdir(parents=True)
    (runs / "truncated_run" / "runs" / "run" / "last.pt").write_bytes((fx / "truncated.pt").read_bytes())
    (runs / "existing_run" / "runs" / "run").mkdir(parents=True)
    save_checkpoint(
        {"kind": "retrain", "model": "test_vim", "step": 3}, runs / "existing_run" / "runs" / "run" / "last.pt"
    )

    (runs / "files_run" / "runs" / "run").mkdir(parents=True)
    for name in ("args.yaml", "summary.csv"):  # a user's run files without a checkpoint (its first epoch not done)
        (runs / "files_run" / "runs" / "run" / name).write_text("kept\n")
    # A run made at 32 px (the spec its checkpoint stores) resumed by a 16 px command; a search of the default width
    # (at 32 px, where its candidates are distinct scans) resumed with another one.
    (runs / "run_at_32px" / "runs" / "run").mkdir(parents=True)
    spec = {"name": "test_vim", "kwargs": {"num_classes": 10, "in_chans": 3, "img_size": 32}, "arch": None}
    save_checkpoint(
        {"kind": "retrain", "model": "test_vim", "model_spec": spec, "step": 3},
        runs / "run_at_32px" / "runs" / "run" / "last.pt",
    )
    # A run whose model resolved d_state=8 (test_vim's default then; 4 now) resumed by the same command: the passed
    # arguments are equal, the models are not.
    (runs / "run_other_default" / "runs" / "run").mkdir(parents=True)
    spec = {"name": "test_vim", "kwargs": {"num_classes": 10, "in_chans": 3, "img_size": 16}, "arch": None}
    spec["resolved_kwargs"] = {"num_classes": 10, "in_chans": 3, "img_size": [16, 16], "d_state": 8}
    save_checkpoint(
        {"kind": "retrain", "model": "test_vim", "model_spec": spec, "step": 3},
        runs / "run_other_default" / "runs" / "run" / "last.pt",
    )
    # A 16 px run of test_vim trained for 2 epochs, resumed with --epochs 5 (its LR schedule was built for 2).
    (runs / "run_2_epochs" / "runs" / "run").mkdir(parents=True)
    spec = {"name": "test_vim", "kwargs": {"num_classes": 10, "in_chans": 3, "img_size": 16}, "arch": None}
    save_checkpoint(
        {"kind": "retrain", "model": "test_vim", "model_spec": spec, "step": 3, "config": {"epochs": 2, "lr": 1e-3}},
        runs / "run_2_epochs" / "runs" / "run" / "last.pt",
    )
    # The same run, its optimizer adamw, resumed with --opt sgd (whose step reads a 'momentum' adamw's state lacks).
    (runs / "run_adamw" / "runs" / "run").mkdir(parents=True)
    save_checkpoint(
        {"kind": "retrain", "model": "test_vim", "model_spec": spec, "step": 3, "config": {"opt": "adamw"}},
        runs / "run_adamw" / "runs" / "run" / "last.pt",
    )
    # A search that took 8 steps of 16 per epoch (128 weight images) resumed with 64 images (32 weight images, 2
    # steps): its position in the epoch and its schedule do not fit.
    (runs / "search_8_steps" / "runs" / "run").mkdir(parents=True)
    spec32 = {"name": "test_local_vim_search", "kwargs": {"num_classes": 10, "in_chans": 3, "img_size": 32}}
    save_checkpoint(
        {"kind": "search", "model": "test_local_vim_search", "model_spec": spec32, "step": 3, "steps_per_epoch": 8,
         "train_size": 128},
        runs / "search_8_steps" / "runs" / "run" / "last.pt",
    )  # fmt: skip
    (runs / "search_run" / "runs" / "run").mkdir(parents=True)
    spec = {"name": "test_local_vim_search", "kwargs": {"num_classes": 10, "in_chans": 3, "img_size": 32}}
    save_checkpoint(
        {"kind": "search", "model": "test_local_vim_search", "model_spec": spec, "step": 3},
        runs / "search_run" / "runs" / "run" / "last.pt",
    )

    (fx / "space_unknown.yaml").write_text(yaml.safe_dump({"params": {"arch_lrr": {"distribution": "loguniform"}}}))
    (fx / "space_bad_dist.yaml").write_text(
        yaml.safe_dump({"params": {"arch_lr": {"distribution": "logunifrom", "low": 1e-4, "high": 1e-2}}})
    )
    (fx / "space_bad_choice.yaml").write_text(
        yaml.safe_dump({"params": {"algo": {"distribution": "choice", "values": ["darts", "dart"]}}})
    )
    (fx / "space_warmup_range.yaml").write_text(
        yaml.safe_dump({"params": {"arch_warmup_epochs": {"distribution": "int", "low": 0, "high": 3}}})
    )
    grace = {"params": {"lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}}, "asha": {"grace_period": 2}}
    (fx / "space_grace2.yaml").write_text(yaml.safe_dump(grace))
    warmup = {"model": "test_local_vim_search", "epochs": 1, "arch_warmup_epochs": 1}
    (fx / "search_base_warmup.yaml").write_text(yaml.safe_dump(warmup))
    (fx / "space_low_high.yaml").write_text(
        yaml.safe_dump({"params": {"arch_lr": {"distribution": "loguniform", "low": 0.1, "high": 0.01}}})
    )
    owned = {"models": [{"name": "vim", "model": "test_vim", "overrides": {"model_kwargs": {"patch_size": 2}}}]}
    (fx / "compare_owned.yaml").write_text(yaml.safe_dump(owned))
    owned = {"model": "test_local_vim_search", "epochs": 2, "model_kwargs": {"in_chans": 1}}
    (fx / "search_base_owned.yaml").write_text(yaml.safe_dump(owned))
    (fx / "retrain_base_18.yaml").write_text(yaml.safe_dump({"model": "test_vim", "img_size": 18, "epochs": 1}))
    nodata = {"model": "test_vim", "dataset": "fashion_mnist", "data_dir": str(fx / "nowhere"), "epochs": 1}
    (fx / "retrain_base_nodata.yaml").write_text(yaml.safe_dump(nodata))
    (fx / "space_lr.yaml").write_text(
        yaml.safe_dump({"params": {"lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}}})
    )
    (fx / "compare_bad.yaml").write_text(yaml.safe_dump({"models": [{"name": "vim", "modle": "test_vim"}]}))
    (fx / "compare_ok.yaml").write_text(yaml.safe_dump({"models": [{"name": "vim", "model": "test_vim"}]}))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """Run every case once (one runner process); per case: exit status, stderr, and the files before / after."""
    base = tmp_path_factory.mktemp("bad_input")
    fx = base / "fx"
    _make_fixtures(fx)
    cases = []
    for case in CASES + ACCEPTED:
        out = base / "out" / case.id
        out.mkdir(parents=True)
        for name in case.setup:
            subprocess.run(["cp", "-a", str(fx / "setups" / name) + "/.", str(out)], check=True)
        argv = [a.format(fx=fx, out=out) for a in case.argv]
        if case.module in ("retrain.train", "nas.search") and "--eval-only" not in argv:
            argv += ["--output", str(out / "runs")]
        cases.append({"id": case.id, "module": case.module, "argv": argv, "cwd": str(out)})
    (base / "cases.json").write_text(json.dumps(cases))
    before = fingerprint(base)
    proc = subprocess.run(
        [sys.executable, str(HERE / "cli_runner.py"), str(base / "cases.json"), str(base / "results.json")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = fingerprint(base)
    res = json.loads((base / "results.json").read_text())
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    for case in CASES:
        prefixes = (f"out/{case.id}/", "fx/")
        res[case.id]["changed"] = sorted(
            k for k in changed if k.startswith(prefixes) or k == f"out/{case.id}" or not k.startswith("out/")
        )
    return res


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(results, case) -> None:
    r = results[case.id]
    lines = r["stderr"].strip().splitlines()
    assert r["code"] == 2, f"exit {r['code']}; stdout: {r['stdout'][-1000:]}"
    assert len(lines) == 1, r["stderr"][-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in r["stderr"], lines[0]
    assert re.search(case.expect, lines[0]), lines[0]
    ignore = {"cases.json", "results.json"}
    assert not [k for k in r["changed"] if k not in ignore], r["changed"]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_valid_edge_input_is_accepted(results, case) -> None:
    r = results[case.id]
    assert r["code"] == 0, r["stderr"][-3000:]


def test_catalogue_covers_every_area() -> None:
    areas = {c.id.split("-")[0] for c in CASES}
    assert {"config", "data", "size", "arch", "ckpt", "derive", "sweep", "compare", "orders"} <= areas
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module", autouse=True)
def debug_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """test_debug_shows_the_traceback's CLI process, started with this module's first test (before the case runner,
    which runs on one core meanwhile) rather than after the catalogue: (process, its stderr file)."""
    if not is_selected(request, "test_debug_shows_the_traceback"):
        yield None
        return
    base = tmp_path_factory.mktemp("debug")
    (tmp_path := base / "run").mkdir()
    cmd = [sys.executable, "-m", "retrain.train", *TRAIN, "--lr", "-1", "--output", str(tmp_path), "--debug"]
    err = base / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=f)
    yield proc, err
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_debug_shows_the_traceback(debug_run) -> None:
    proc, err = debug_run
    returncode, stderr = proc.wait(timeout=120), err.read_text()
    assert returncode == 2 and "Traceback" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: --lr -1.0 is out of range")
