#!/usr/bin/env bash
# The real-data results: search on Fashion-MNIST with DARTS (GDAS beside it with GDAS=1), derive the arch, then
# retrain it (with and without SLWS) next to size-matched Vim, VMamba, LocalMamba-fixed and MambaOut, three seeds
# each, all runs side by side (spread over every visible GPU), and write the comparison table.
#   DATA=fashion_mnist.npz RUN_DIR=runs/fmnist bash scripts/fmnist_gpu.sh
# RESULTS=dir also copies the small result files (arch, plots, tables, logs, per-run summaries) there.
# To split the work over machines: ARCH=arch.yaml skips the search and uses that arch; TRAIN_ROWS="vim vmamba" trains
# only those rows (the others are collected when their run directories are there; see retrain.compare).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
DATA="${DATA:?set DATA to the Fashion-MNIST .npz or IDX folder}"
RUN_DIR="${RUN_DIR:-runs/fmnist}"
JOBS="${JOBS:-18}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$RUN_DIR"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }

if [ -z "${ARCH:-}" ]; then
  stamp "search: DARTS${GDAS:+ and GDAS side by side}"
  "$PY" -m nas.search -c configs/search/fashion_mnist.yaml --data-dir "$DATA" --output "$RUN_DIR" \
    --experiment search-darts --algo darts > "$RUN_DIR/search-darts.log" 2>&1 &
  darts=$!
  if [ -n "${GDAS:-}" ]; then
    "$PY" -m nas.search -c configs/search/fashion_mnist.yaml --data-dir "$DATA" --output "$RUN_DIR" \
      --experiment search-gdas --algo gdas > "$RUN_DIR/search-gdas.log" 2>&1 &
    wait $!
  fi
  wait $darts
  tail -n 2 "$RUN_DIR"/search-*.log

  stamp "derive"
  "$PY" -m nas.vis_search_prob "$RUN_DIR/search-darts" --out "$RUN_DIR/arch.yaml" --overwrite
  if [ -n "${GDAS:-}" ]; then
    "$PY" -m nas.vis_search_prob "$RUN_DIR/search-gdas" --out "$RUN_DIR/arch-gdas.yaml" --overwrite \
      > "$RUN_DIR/derive-gdas.log"
  fi
else
  [ "$ARCH" -ef "$RUN_DIR/arch.yaml" ] || cp "$ARCH" "$RUN_DIR/arch.yaml"
fi

stamp "retrain and compare ($JOBS runs at a time)"
status=0
timeout "${COMPARE_LIMIT:-0}" "$PY" -m retrain.compare -c configs/compare/fmnist.yaml --arch "$RUN_DIR/arch.yaml" \
  --data-dir "$DATA" --output "$RUN_DIR" --jobs "$JOBS" ${TRAIN_ROWS:+--train-rows $TRAIN_ROWS} || status=$?
stamp "done (compare exit $status)"
if [ -n "${RESULTS:-}" ]; then
  mkdir -p "$RESULTS"
  cp "$RUN_DIR"/arch*.yaml "$RUN_DIR"/arch*.png "$RUN_DIR"/search-*.log "$RESULTS"/ 2>/dev/null || true
  cp "$RUN_DIR"/compare-fmnist/comparison.* "$RESULTS"/ 2>/dev/null || true
  tar czf "$RESULTS/runs.tar.gz" --exclude='*.pt' -C "$RUN_DIR" . 2>/dev/null || true
fi
exit $status
