#!/usr/bin/env bash
# The real-data results on one GPU: search on Fashion-MNIST with DARTS and with GDAS side by side, derive the DARTS
# arch, then retrain it (with and without SLWS) next to size-matched Vim, VMamba, LocalMamba-fixed and MambaOut, three
# seeds each, all runs side by side on the one GPU, and write the comparison table.
#   DATA=fashion_mnist.npz OUT=runs/fmnist bash scripts/fmnist_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
DATA="${DATA:?set DATA to the Fashion-MNIST .npz or IDX folder}"
OUT="${OUT:-runs/fmnist}"
JOBS="${JOBS:-18}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }

stamp "search: DARTS and GDAS side by side"
"$PY" -m nas.search -c configs/search/fashion_mnist.yaml --data-dir "$DATA" --output "$OUT" --experiment search-darts \
  --algo darts > "$OUT/search-darts.log" 2>&1 &
darts=$!
"$PY" -m nas.search -c configs/search/fashion_mnist.yaml --data-dir "$DATA" --output "$OUT" --experiment search-gdas \
  --algo gdas > "$OUT/search-gdas.log" 2>&1 &
gdas=$!
wait $darts; wait $gdas
tail -n 3 "$OUT/search-darts.log" "$OUT/search-gdas.log"

stamp "derive"
"$PY" -m nas.vis_search_prob "$OUT/search-darts" --out "$OUT/arch.yaml" --overwrite
"$PY" -m nas.vis_search_prob "$OUT/search-gdas" --out "$OUT/arch-gdas.yaml" --overwrite > "$OUT/derive-gdas.log"

stamp "retrain and compare ($JOBS runs at a time)"
"$PY" -m retrain.compare -c configs/compare/fmnist.yaml --arch "$OUT/arch.yaml" --data-dir "$DATA" --output "$OUT" \
  --jobs "$JOBS"
stamp "done"
