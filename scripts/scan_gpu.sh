#!/usr/bin/env bash
# The scan's GPU evidence in one go: tune the block sizes (while mamba-ssm's kernel builds), then the same-run
# benchmark against mamba-ssm and the LocalMamba pattern, then the correctness grid with the tuned sizes.
#   ANCHOR=path/to/mamba_anchor OUT=benchmarks COMMIT=$(git rev-parse HEAD) bash scripts/scan_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
ANCHOR="${ANCHOR:?set ANCHOR to the folder holding mamba_anchor/build.py}"
OUT="${OUT:-benchmarks}"
COMMIT="${COMMIT:-unknown}"
GPU="$("$PY" -c 'import torch; from supernet.bench import gpu_slug; print(gpu_slug(torch.cuda.get_device_name()))')"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }

stamp "build mamba-ssm's scan in the background; tune"
MAX_JOBS="${MAX_JOBS:-8}" "$PY" "$ANCHOR/build.py" > "$OUT/mamba_build.log" 2>&1 &
build=$!
CONFIGS=()
# A fresh file only: a tuning that fails or runs out of time must not leave an older file in charge.
rm -f "$OUT/scan_configs_$GPU.json"
if timeout "${TUNE_LIMIT:-300}" "$PY" -m kernels.bench --tune --tune-only --no-mamba --commit "$COMMIT" \
  --configs-out "$OUT/scan_configs_$GPU.json"; then
  CONFIGS=(--configs "$OUT/scan_configs_$GPU.json")
else
  echo "tuning did not finish: benchmarking the built-in block sizes"
fi
wait $build; tail -n 1 "$OUT/mamba_build.log"

stamp "benchmark"
timeout "${BENCH_LIMIT:-200}" "$PY" -m kernels.bench "${CONFIGS[@]}" --mamba-anchor "$ANCHOR" --commit "$COMMIT" \
  --out "$OUT/scan_$GPU.json" ${BENCH_FLAGS:-}
stamp "correctness grid"
timeout "${CHECK_LIMIT:-150}" "$PY" -m kernels.check_gpu "${CONFIGS[@]}" --mamba-anchor "$ANCHOR" --commit "$COMMIT" \
  --out "$OUT/kernels_$GPU.json"
stamp "done"
