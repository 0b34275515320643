"""difftori.refiners: refine a base policy's action window at test time.

``REFINERS`` registers ``difftori`` (CVAE + differentiable trajectory optimisation), ``residual``
and ``ibc``; :class:`~difftori.refiners.base.RefinedPolicy` composes a base policy and a refiner.
"""

from difftori.refiners import difftori, ibc, residual  # noqa: F401  (register the refiners)
from difftori.refiners.base import REFINERS, RefinedPolicy, Refiner

__all__ = ["REFINERS", "RefinedPolicy", "Refiner"]
