#!/usr/bin/env bash
# One-step, idempotent install of difftori and its pinned stack into ./.venv (or $DIFFTORI_VENV).
#
#   bash scripts/install.sh            # the default suite (MetaWorld, DP3/Diffusion, Theseus, DVC)
#   DIFFTORI_EXTRAS=dev bash scripts/install.sh   # + test tools (what scripts/test.sh uses)
#
# Re-running is cheap: the install is skipped while the pins, pyproject.toml and this script are
# unchanged. The robomimic suite (robosuite 1.5.2, robomimic 0.3.0) is part of the default install:
# its pins force numpy 1.26.4 and zarr 3.0.10 (requirements/constraints.txt). So is the maniskill
# suite (mani-skill 3.0.1, sapien 3.0.3) with a private CPU Vulkan driver (see below).
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
# --- A CPU Vulkan driver for the maniskill suite -------------------------------------------------
# sapien 3 (ManiSkill 3) needs a Vulkan device even for state observations. Debian bookworm's
# lavapipe (Mesa 22) is refused; Mesa 25's, from bookworm-backports, works. Its package is
# downloaded with a private apt configuration (the system's apt sources stay as they are) and
# extracted into $VENV/vulkan; eval/suites/maniskill.py points VK_ICD_FILENAMES at
# $VENV/vulkan/lvp_icd.json when no other Vulkan driver is configured.
MESA_VULKAN="25.0.7-2~bpo12+1"
install_lavapipe() {
  local dir tmp
  dir="$(cd "$VENV" && pwd)/vulkan"
  [ -f "$dir/lvp_icd.json" ] && return 0
  if ! command -v apt-get >/dev/null || ! grep -q "VERSION_CODENAME=bookworm" /etc/os-release \
     || [ "$(dpkg --print-architecture)" != amd64 ]; then
    echo "install.sh: not Debian bookworm amd64: the maniskill suite needs a Vulkan driver (Mesa >= 24)" >&2
    return 0
  fi
  tmp="$dir.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian" \
    "bookworm-backports main" > "$tmp/sources.list"
  local apt=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o Debug::NoLocking=1
             -o APT::Sandbox::User="$(id -un)")
  apt-get "${apt[@]}" update -qq
  (cd "$tmp" && { apt-get "${apt[@]}" download -qq "mesa-vulkan-drivers=$MESA_VULKAN" ||
                  apt-get "${apt[@]}" download -qq mesa-vulkan-drivers/bookworm-backports; })
  dpkg -x "$tmp"/mesa-vulkan-drivers_*.deb "$tmp/root"
  printf '{"file_format_version": "1.0.0", "ICD": {"api_version": "1.4.305", "library_path": "%s"}}\n' \
    "$dir/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so" > "$tmp/lvp_icd.json"
  rm -rf "$tmp/lists" "$tmp/cache" "$tmp"/*.deb "$dir" && mv "$tmp" "$dir"
  echo "install.sh: Mesa's lavapipe Vulkan driver in $dir"
}
install_lavapipe

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
from difftori.eval.suites.maniskill import _make
_make({"env_id": "PickCube-v1", "env_kwargs": {"obs_mode": "state"}}).close()  # Vulkan works
print(f"install.sh: torch {torch.__version__}, theseus {theseus.__version__}, zarr {zarr.__version__}, "
      f"mujoco {mujoco.__version__}")
PY
echo "$want" > "$stamp"
echo "install.sh: done in $(( $(date +%s) - start )) s; venv $(du -sh "$VENV" | cut -f1)"
