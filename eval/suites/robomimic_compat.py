"""Make robomimic 0.3.0 run on robosuite 1.5.2 + mujoco 3.3 + CPU torch: three measured fixes.

:func:`apply` installs each fix only where it is needed, and is idempotent (call it before any
robomimic import; the suite module does, inside its lazy imports):

1. ``mujoco_py``: robomimic's ``envs/env_robosuite.py`` does ``import mujoco_py`` (only for
   ``mujoco_py.builder.MujocoException``); robosuite 1.5 runs on ``mujoco`` and no ``mujoco_py``
   is installed. Fix: a stub module exposing ``mujoco_py.builder.MujocoException``, installed only
   when no real ``mujoco_py`` is importable.
2. Controller configs: robosuite 1.5 rejects the per-arm controller configs of robosuite <= 1.4
   (robomimic's released datasets and checkpoints store those in ``env_args``). Fix:
   ``EnvRobosuite.__init__`` converts such a config with robosuite's own
   ``refactor_composite_controller_config(cfg, robot, ["right"])``; configs already in 1.5's
   composite format pass unchanged.
3. torchvision: robomimic pulls torchvision 0.28.0, whose wheel links CUDA libraries; with a CPU
   torch its ``_C`` extension fails to load and ``import torchvision`` then raises "operator
   torchvision::nms does not exist" (its fake-tensor registrations need the op schemas). Fix: try
   to load the extension first; only if that fails, define the ``torchvision::nms`` and
   ``torchvision::qnms`` schemas with ``torch.library`` (no kernels: detection ops stay
   unavailable; resnet18 and transforms work). A venv made by ``scripts/install.sh`` already has
   an import hook doing this (``difftori_torchvision_compat``); then nothing is defined here.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SINGLE_ARMS = ["right"]
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_keep_alive: list[Any] = []  # torch.library.Library objects deregister their ops when collected
_applied: dict[str, bool] = {}


def apply() -> dict[str, bool]:
    """Install the fixes this machine needs; returns fix name -> whether it was installed (once)."""
    if not _applied:
        _applied["mujoco_py_stub"] = _stub_mujoco_py()
        _applied["torchvision_op_schemas"] = _define_torchvision_schemas()
        _applied["controller_config_refactor"] = _patch_controller_configs()
        log.debug("robomimic compat fixes: %s", _applied)
    return dict(_applied)


def _stub_mujoco_py() -> bool:
    if "mujoco_py" in sys.modules or importlib.util.find_spec("mujoco_py") is not None:
        return False
    pkg = types.ModuleType("mujoco_py")
    pkg.__doc__ = "difftori stub: robomimic 0.3.0 only reads mujoco_py.builder.MujocoException."
    builder = types.ModuleType("mujoco_py.builder")

    class MujocoException(Exception):
        """Stand-in for mujoco_py's simulation error (robosuite 1.5 raises mujoco's own)."""

    builder.MujocoException = MujocoException  # type: ignore[attr-defined]
    pkg.builder = builder  # type: ignore[attr-defined]
    pkg.MujocoException = MujocoException  # type: ignore[attr-defined]
    sys.modules["mujoco_py"] = pkg
    sys.modules["mujoco_py.builder"] = builder
    return True


def _torchvision_extension() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (root / f"_C{suffix}").exists():
            return root / f"_C{suffix}"
    return None


def _define_torchvision_schemas() -> bool:
    """Define the op schemas only when torchvision's own extension cannot provide them."""
    if "torchvision" in sys.modules:
        return False  # already imported (it worked, or the caller handled it)
    ext = _torchvision_extension()
    if ext is None:
        return False  # torchvision absent, or a build without the extension: nothing to fix
    import torch

    if all(_op_exists(torch, name) for name in _TORCHVISION_SCHEMAS):
        return False  # defined already (e.g. by scripts/install.sh's import hook)
    try:
        torch.ops.load_library(str(ext))  # what torchvision's import does; dlopen is idempotent
        return False
    except OSError as e:
        log.debug("torchvision extension %s does not load (%s); defining its op schemas", ext, e)
    lib = torch.library.Library("torchvision", "FRAGMENT")  # coexists with other definitions
    for name, schema in _TORCHVISION_SCHEMAS.items():
        if not _op_exists(torch, name):
            lib.define(schema)
    _keep_alive.append(lib)
    return True


def _op_exists(torch: Any, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _patch_controller_configs() -> bool:
    """Wrap ``EnvRobosuite.__init__`` so that pre-1.5 controller configs are converted."""
    try:
        from robosuite.controllers.composite.composite_controller_factory import (
            refactor_composite_controller_config,
        )
    except ImportError:
        return False  # robosuite < 1.5 takes the old configs as they are
    from robomimic.envs.env_robosuite import EnvRobosuite  # needs the mujoco_py stub first

    init = EnvRobosuite.__init__
    if getattr(init, "_difftori_compat", False):
        return False

    def __init__(self: Any, env_name: str, *args: Any, **kwargs: Any) -> None:
        cfg = kwargs.get("controller_configs")
        if isinstance(cfg, dict):
            robots = kwargs.get("robots", "Panda")
            robot = robots if isinstance(robots, str) else robots[0]
            kwargs["controller_configs"] = refactor_composite_controller_config(cfg, robot, _SINGLE_ARMS)
        init(self, env_name, *args, **kwargs)

    __init__._difftori_compat = True  # type: ignore[attr-defined]
    __init__.__doc__ = init.__doc__
    EnvRobosuite.__init__ = __init__  # type: ignore[method-assign]
    return True


def run_script(module: str, args: list[str]) -> str:
    """Run a robomimic script (e.g. ``robomimic.scripts.dataset_states_to_obs``) unmodified, as
    ``python -m <module> <args>`` would, in this process after :func:`apply`; returns what it
    printed (also logged at debug level). A failing script raises ``RuntimeError`` with that."""
    import contextlib
    import io
    import runpy

    apply()
    printed = io.StringIO()
    argv = sys.argv
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except (Exception, SystemExit) as e:  # argparse exits; the scripts assert
        raise RuntimeError(
            f"{module} {' '.join(args)} failed: {type(e).__name__}: {e}\n{printed.getvalue()[-2000:]}"
        ) from e
    finally:
        sys.argv = argv
    log.debug("%s printed:\n%s", module, printed.getvalue())
    return printed.getvalue()
