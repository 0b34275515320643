"""difftori.base_policies: base policies behind one contract (:mod:`.base`) and a registry by name.

``make_policy(name, config, shape_meta)`` builds one, ``load_policy(dir)`` rebuilds a saved one.
Adding a policy is adding one module that registers its class.
"""

from difftori.base_policies import bc_rnn, diffusion, pointnet_bc  # noqa: F401  (register the policies)
from difftori.base_policies.base import BasePolicy, ShapeMeta
from difftori.base_policies.registry import POLICIES, load_policy, make_policy

__all__ = ["POLICIES", "BasePolicy", "ShapeMeta", "load_policy", "make_policy"]
