#!/usr/bin/env bash
# Install if needed, then run the whole pipeline (dvc.yaml) on params.yaml's suite.
# Extra arguments go to `dvc repro` (e.g. a stage name, or --force).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export MUJOCO_GL=${MUJOCO_GL:-egl} DVC_NO_ANALYTICS=1
export PATH="$PWD/${DIFFTORI_VENV:-.venv}/bin:$PATH"
exec dvc repro "$@"
