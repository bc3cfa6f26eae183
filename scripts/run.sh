#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, put the raw data in place, run the whole
# pipeline (CPU profile in params.yaml: every stage with the EF-FER1 ablation, ~15 min on
# 2 cores), and print a short summary of the run. Extra arguments go to `dvc repro` (e.g. -f).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
dlfer setup-data
dvc repro "$@"
dlfer summary
