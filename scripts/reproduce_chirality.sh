#!/usr/bin/env bash
# Reproduce the feature-chirality table (chirality spec §7). SMOKE=1 runs the offline smoke grid.
# Extra arguments go to train.py, e.g. hydra/launcher=slurm hydra.launcher.partition=gpu trainer=gpu
set -euo pipefail
cd "$(dirname "$0")/.."
experiment=chirality_init
[[ "${SMOKE:-0}" == 1 ]] && experiment=chirality_init_smoke
sweep_dir="outputs/multiruns/${experiment}_$(date +%Y-%m-%d_%H-%M-%S)"
python train.py -m "experiment=${experiment}" "hydra.sweep.dir=${sweep_dir}" "$@"
python scripts/make_tables.py "${sweep_dir}" --out "outputs/tables/${experiment}"
