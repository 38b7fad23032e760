#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic data, on CPU, in a few minutes:
#   1. search   a small LocalVim supernet (nas.search)
#   2. derive   the per-layer scan orders into an arch file, heatmap and trajectories (nas.vis_search_prob)
#   3. retrain  the derived arch and two baselines, same recipe, two seeds, and print the comparison (retrain.compare)
# Every run writes into a fresh demo_runs/<UTC time>/ directory, so a rerun never collides with an earlier one.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tiny models: one thread per process is faster than several fighting over small ops.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
RUN="demo_runs/$(date -u +%Y%m%d-%H%M%S)-$$"
mkdir -p "$RUN"
start=$(date +%s)
stamp() { echo; echo "== [$(( $(date +%s) - start )) s] $*"; }

stamp "1/3 search: nas.search -c configs/demo/search.yaml -> $RUN/search"
"$PY" -m nas.search -c configs/demo/search.yaml --output "$RUN" --experiment search

stamp "2/3 derive: nas.vis_search_prob $RUN/search -> $RUN/arch.yaml"
"$PY" -m nas.vis_search_prob "$RUN/search" --out "$RUN/arch.yaml"

stamp "3/3 retrain the derived arch and two baselines, then compare: retrain.compare -c configs/demo/compare.yaml"
"$PY" -m retrain.compare -c configs/demo/compare.yaml --arch "$RUN/arch.yaml" --output "$RUN"

stamp "demo finished in $(( $(date +%s) - start )) s; everything is under $RUN/"
echo "  arch file:   $RUN/arch.yaml  (heatmap: $RUN/arch_heatmap.png, trajectories: $RUN/arch_trajectory.png)"
echo "  comparison:  $RUN/compare/comparison.md  (.csv, .png)"
