#!/usr/bin/env bash
# One-step, idempotent install of difftori and its pinned stack into ./.venv (or $DIFFTORI_VENV).
#
#   bash scripts/install.sh            # the default suite (MetaWorld, DP3/Diffusion, Theseus, DVC)
#   DIFFTORI_EXTRAS=dev bash scripts/install.sh   # + test tools (what scripts/test.sh uses)
#
# Re-running is cheap: the install is skipped while the pins, pyproject.toml and this script are
# unchanged. The robomimic suite (robosuite 1.5.2, robomimic 0.3.0) is part of the default install:
# its pins force numpy 1.26.4 and zarr 3.0.10 (requirements/constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${DIFFTORI_VENV:-.venv}
EXTRAS=${DIFFTORI_EXTRAS:-dev}
PY=${PYTHON:-python3}
CONSTRAINTS=requirements/constraints.txt
export PIP_CONSTRAINT="$PWD/$CONSTRAINTS"  # torch==2.13.0 (CPU) and friends, on EVERY pip call
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp="$VENV/.difftori-install"
want="$(cat "$CONSTRAINTS" pyproject.toml scripts/install.sh requirements/torchvision_compat.py | sha256sum | cut -d' ' -f1) extras=$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
start=$(date +%s)

# --- Debian packages: offscreen GL for MuJoCo (EGL, mesa) and libusb for open3d's import ---------
missing=()
have_lib() { ldconfig -p 2>/dev/null | grep -q "$1"; }
have_lib libEGL.so.1 || missing+=(libegl1)
have_lib libGL.so.1 || missing+=(libgl1)
[ -e /usr/lib/x86_64-linux-gnu/dri/swrast_dri.so ] || have_lib libEGL_mesa.so.0 || missing+=(libegl-mesa0 libgl1-mesa-dri)
have_lib libOSMesa.so || missing+=(libosmesa6)
have_lib libusb-1.0.so.0 || missing+=(libusb-1.0-0)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" = none ]; then
    echo "install.sh: please install the Debian packages: ${missing[*]}" >&2
  else
    echo "install.sh: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

# --- Python packages ------------------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip wheel setuptools
# Theseus build prerequisites first (its sdist needs torch at build time).
pip install -q torch numpy scipy pybind11 semantic-version torchlie torchkin
# Everything else, then difftori itself (editable: the folders are the difftori.* subpackages).
pip install -q -e ".[$EXTRAS]"
# theseus-ai 0.2.3 is source-only; a normal install fails building scikit-sparse (only the Cholmod
# sparse solver needs it, which difftori does not use). Install it without deps, without isolation.
pip install -q --no-deps --no-build-isolation theseus-ai
# robomimic pulls the registry's torchvision, a CUDA build whose ops library cannot load beside CPU
# torch, which breaks `import torchvision` (and lightning's import with it): an import hook defines
# the missing op schemas when, and only when, that library fails to load (see the module).
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp requirements/torchvision_compat.py "$site/difftori_torchvision_compat.py"
echo "import difftori_torchvision_compat; difftori_torchvision_compat.install()" \
  > "$site/difftori-torchvision-compat.pth"
"$VENV/bin/python" - <<'PY'
import warnings
warnings.filterwarnings("ignore")
import theseus, torch, zarr, mujoco, metaworld, lightning, torchvision, robosuite, robomimic  # noqa: F401
from difftori.datasets.pointcloud import open3d
open3d()
print(f"install.sh: torch {torch.__version__}, theseus {theseus.__version__}, zarr {zarr.__version__}, "
      f"mujoco {mujoco.__version__}")
PY
echo "$want" > "$stamp"
echo "install.sh: done in $(( $(date +%s) - start )) s; venv $(du -sh "$VENV" | cut -f1)"
