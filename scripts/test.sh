#!/usr/bin/env bash
# Install if needed, then run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export MUJOCO_GL=${MUJOCO_GL:-egl} DVC_NO_ANALYTICS=1
exec "${DIFFTORI_VENV:-.venv}/bin/python" -m pytest "$@"
