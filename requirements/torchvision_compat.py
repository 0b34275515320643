"""Let the registry's torchvision import next to a CPU-only torch (installed by scripts/install.sh).

robomimic 0.3.0 requires torchvision; the only torchvision 0.28.0 on the package registry is a CUDA
build whose C++ ops library (``torchvision/_C.so``) cannot load without CUDA's libraries. Without
it, ``import torchvision`` fails ("operator torchvision::nms does not exist"), and so does every
import of lightning, whose torchmetrics imports torchvision when it is installed.

scripts/install.sh puts this module and a one-line ``.pth`` file into the venv's site-packages, so
that at interpreter start a tiny import hook is registered (no torch import then). The first
``import torchvision`` runs :func:`apply` first: if the ops library loads, nothing changes;
otherwise the two op schemas torchvision's import registers fake kernels for (``nms`` and
``qnms``) are defined. Models and transforms then work; the compiled ops (nms, roi_align, ...)
are unavailable, and nothing in difftori or robomimic's low-dim/ResNet paths uses them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # keeps the defined schemas alive


def apply(package_dir: str) -> bool:
    """Define the op schemas if torchvision's ops library in ``package_dir`` cannot load; returns
    whether it did (a no-op when the library loads or the schemas exist)."""
    global _LIBRARY
    import torch

    try:
        torch.ops.load_library(os.path.join(package_dir, "_C.so"))
        return False
    except (OSError, RuntimeError):
        pass
    if _LIBRARY is not None or torch._C._dispatch_has_kernel("torchvision::nms"):
        return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS.values():
        _LIBRARY.define(schema)
    return True


class _Hook(importlib.abc.MetaPathFinder):
    """Runs :func:`apply` once, just before torchvision is first imported."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            apply(list(spec.submodule_search_locations)[0])
        return spec


def install() -> None:
    """Register the import hook (called from the ``.pth`` file at interpreter start)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
