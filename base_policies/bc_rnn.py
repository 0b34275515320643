"""BC-RNN (``bc_rnn``): robomimic's own recurrent behaviour cloning behind the BasePolicy contract.

The networks and the loss are robomimic 0.3.0's: its config factory (``config_factory("bc")``
with ``algo.rnn.enabled``) and algorithm factory build ``BC_RNN`` (or ``BC_RNN_GMM`` with
``gmm``), and training calls that algorithm's own ``_forward_training`` / ``_compute_losses``
(L2 on the actions; negative log-likelihood with the GMM head) on our normalised batches. Only the
optimisation loop is ours (Lightning, like every base policy), so BC-RNN resumes, logs to dvclive
and checkpoints (safetensors + JSON) like the others. Normalisation (min/max to [-1, 1], robomimic's
tanh-squashed action range) lives in the policy, as for the other policies.

Recurrence, as robomimic rolls it out (``BC_RNN.get_action``): the LSTM state starts at zero at
``reset()`` and again every ``seq_length`` steps; each call consumes one observation (``n_obs_steps``
1) and gives one action (``horizon`` 1, ``n_action_steps`` 1). Training samples are sequences of
``seq_length`` steps (robomimic's ``rnn.horizon``), each from a zero state; a sequence near an
episode's start repeats its first step (diffusion_policy-style windows; robomimic pads the end).

The window refiners see is the next action (H = 1): an RNN rollout of H > 1 actions would need the
observations of the steps it has not seen yet (robomimic's ``open_loop`` mode is a different
policy), so refiners correct each executed action, and ``init-actions`` produces each step's window
by walking the episode in order with the hidden state carried, as at test time.

A ``.pth`` written by robomimic's own ``train.py`` imports as a ``bc_rnn``
(:meth:`BCRNN.import_file`; ``base_checkpoints`` in params). Observation keys must be low-dim here
(robomimic's image encoder is a ResNet-18, ~65 s a step on a CPU): an image key is an error naming it.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from difftori.base_policies.base import (
    BasePolicy,
    Generators,
    Obs,
    PolicyConfig,
    ShapeMeta,
    multinomial,
    randn,
)
from difftori.base_policies.checkpoint import CheckpointError
from difftori.base_policies.registry import register
from torch.nn import functional as F


@dataclass(frozen=True)
class BCRNNConfig(PolicyConfig):
    """CPU-sized defaults; robomimic's BC-RNN uses ``rnn_hidden_dim`` 400 (``params-paper.yaml``)."""

    horizon: int = 1
    n_obs_steps: int = 1
    n_action_steps: int = 1
    seq_length: int = 10  # robomimic algo.rnn.horizon: training sequence length and state-reset period
    rnn_type: str = "LSTM"  # or "GRU"
    rnn_hidden_dim: int = 100
    rnn_num_layers: int = 2
    actor_layer_dims: tuple[int, ...] = ()
    gmm: bool = False  # robomimic's GMM action head (BC_RNN_GMM)
    gmm_num_modes: int = 5
    gmm_min_std: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.horizon, self.n_obs_steps, self.n_action_steps) != (1, 1, 1):
            raise ValueError(
                "bc_rnn acts one step per call: horizon, n_obs_steps and n_action_steps must be 1"
            )
        if self.seq_length < 1 or self.rnn_hidden_dim < 1 or self.rnn_num_layers < 1:
            raise ValueError("seq_length, rnn_hidden_dim and rnn_num_layers must be >= 1")
        if self.rnn_type not in ("LSTM", "GRU"):
            raise ValueError(f"rnn_type must be 'LSTM' or 'GRU', got {self.rnn_type!r}")


def robomimic_config(config: BCRNNConfig, obs_keys: tuple[str, ...]) -> Any:
    """robomimic's ``bc`` config with the RNN (and GMM) settings of ``config``, low-dim ``obs_keys``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from robomimic.config import config_factory

    rc = config_factory("bc")
    with rc.values_unlocked():
        rc.algo.actor_layer_dims = list(config.actor_layer_dims)
        rc.algo.rnn.enabled = True
        rc.algo.rnn.horizon = config.seq_length
        rc.algo.rnn.hidden_dim = config.rnn_hidden_dim
        rc.algo.rnn.rnn_type = config.rnn_type
        rc.algo.rnn.num_layers = config.rnn_num_layers
        rc.algo.gmm.enabled = config.gmm
        rc.algo.gmm.num_modes = config.gmm_num_modes
        rc.algo.gmm.min_std = config.gmm_min_std
        rc.observation.modalities.obs.low_dim = list(obs_keys)
        rc.observation.modalities.obs.rgb = []
    return rc


def build_robomimic_algo(config: BCRNNConfig, shape_meta: ShapeMeta, obs_keys: tuple[str, ...]) -> Any:
    """robomimic's BC_RNN / BC_RNN_GMM algorithm for low-dim ``obs_keys`` of ``shape_meta``."""
    images = [k for k in obs_keys if shape_meta.obs[k]["kind"] != "lowdim"]
    if images:
        raise ValueError(
            f"bc_rnn: observation key '{images[0]}' is {shape_meta.obs[images[0]]['kind']}; "
            "bc_rnn takes low-dim keys only (set policies.bc_rnn.obs_keys)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import robomimic.utils.obs_utils as obs_utils
        from robomimic.algo import algo_factory

    rc = robomimic_config(config, obs_keys)
    obs_utils.initialize_obs_utils_with_config(rc)  # robomimic's global key -> modality table
    shapes = OrderedDict((k, list(shape_meta.obs[k]["shape"])) for k in obs_keys)
    return algo_factory("bc", rc, shapes, shape_meta.action_dim, torch.device("cpu"))


@register
class BCRNN(BasePolicy):
    """robomimic's BC-RNN; ``self.net`` is its ``nets["policy"]`` (an RNN actor network)."""

    name = "bc_rnn"
    config_cls = BCRNNConfig
    recurrent = True
    uses_obs_encoder = False

    def __init__(self, config: BCRNNConfig, shape_meta: ShapeMeta) -> None:
        super().__init__(config, shape_meta)
        self._algo = build_robomimic_algo(config, shape_meta, self.obs_keys)
        self.net = self._algo.nets["policy"]
        self._state: Any = None
        self._counter = 0
        # robomimic's RNN reuses its decoder as the per-step net: one tensor under two keys, which
        # safetensors refuses. The state dict keeps the first key; loading fills in the other.
        self._aliases = shared_aliases(self)
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)

    @classmethod
    def default_obs_keys(cls, shape_meta: ShapeMeta) -> tuple[str, ...]:
        return tuple(sorted(k for k, v in shape_meta.obs.items() if v["kind"] == "lowdim"))

    def train_window(self) -> tuple[int, int]:
        return self.config.seq_length, self.config.seq_length

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        steps = batch["action"].shape[1]
        rbatch = {
            "obs": self.normalize_obs(batch["obs"], steps),
            "goal_obs": None,
            "actions": self.normalizer.normalize("action", batch["action"].float()),
        }
        return self._algo._compute_losses(self._algo._forward_training(rbatch), rbatch)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._losses(batch)["action_loss"]

    def validation_metrics(self, batch: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
        """Held-out loss, and the MSE (env units) of the actions predicted along each sequence."""
        obs = self.normalize_obs(batch["obs"], batch["action"].shape[1])
        if self.config.gmm:
            dists = self.net.forward_train(obs_dict=obs)
            pred = (
                dists.component_distribution.base_dist.loc * dists.mixture_distribution.probs[..., None]
            ).sum(-2)
        else:
            pred = self.net(obs_dict=obs)
        mse = F.mse_loss(self.normalizer.unnormalize("action", pred), batch["action"].float())
        return {"loss": self.compute_loss(batch), "action_mse": mse}

    def reset(self) -> None:
        """Start an episode: the RNN state goes back to zero (robomimic's ``BC_RNN.reset``)."""
        self._state, self._counter = None, 0

    @torch.no_grad()
    def predict_action_chunk(self, obs: Obs, generator: Generators = None) -> torch.Tensor:
        """(B, 1, Da): the next action, one RNN step on the latest observation."""
        step = {
            k: v[:, -1] for k, v in self.normalize_obs({k: obs[k][:, -1:] for k in self.obs_keys}).items()
        }
        batch = next(iter(step.values())).shape[0]
        if self._state is None or self._counter % self.config.seq_length == 0:
            device = next(iter(step.values())).device
            self._state = self.net.get_rnn_init_state(batch_size=batch, device=device)
        elif _state_batch(self._state) != batch:
            raise ValueError(
                f"bc_rnn: a batch of {batch} after {_state_batch(self._state)} within an episode; "
                "a recurrent policy needs reset() at each episode start and one row per episode"
            )
        self._counter += 1
        if self.config.gmm:
            dist, self._state = self.net.forward_train_step(step, rnn_state=self._state)
            action = _sample_gmm(dist, generator)
        else:
            action, self._state = self.net.forward_step(step, rnn_state=self._state)
        return self.normalizer.unnormalize("action", action)[:, None]

    @classmethod
    def import_file(cls, path: Path) -> BCRNN:
        """The BC-RNN of a ``.pth`` that robomimic 0.3.0's own ``train.py`` wrote (``bc`` with
        ``algo.rnn.enabled``, low-dim observations): its networks, its observation normalisation
        (mean/std, when it trained with one) and its settings, as one of ours (no EMA: the raw
        weights). Raises ``CheckpointError`` naming the file and key for anything else."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from robomimic.utils.file_utils import config_from_checkpoint
        try:  # weights_only: tensors, lists, dicts and strings, never arbitrary pickled objects
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            rc, _ = config_from_checkpoint(ckpt_dict=ckpt)
            shapes, action_dim = ckpt["shape_metadata"]["all_shapes"], int(ckpt["shape_metadata"]["ac_dim"])
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, AssertionError) as e:
            raise CheckpointError(f"{path}: not a robomimic checkpoint ({type(e).__name__}: {e})") from None
        if rc.algo_name != "bc" or not rc.algo.rnn.enabled:
            raise CheckpointError(
                f"{path}: config.algo: a '{rc.algo_name}' policy without rnn, expected BC-RNN"
            )
        obs = rc.observation.modalities.obs
        if any(obs.get(m) for m in obs if m != "low_dim"):
            raise CheckpointError(f"{path}: config.observation: {dict(obs)}; bc_rnn imports low-dim policies")
        config = BCRNNConfig(
            obs_keys=tuple(obs.low_dim),
            seq_length=rc.algo.rnn.horizon,
            rnn_type=rc.algo.rnn.rnn_type,
            rnn_hidden_dim=rc.algo.rnn.hidden_dim,
            rnn_num_layers=rc.algo.rnn.num_layers,
            actor_layer_dims=tuple(rc.algo.actor_layer_dims),
            gmm=bool(rc.algo.gmm.enabled),
            gmm_num_modes=rc.algo.gmm.num_modes,
            gmm_min_std=rc.algo.gmm.min_std,
        )
        meta = ShapeMeta({k: {"shape": list(v), "kind": "lowdim"} for k, v in shapes.items()}, action_dim)
        policy = cls(config, meta)
        net = {k.removeprefix("policy."): v for k, v in ckpt["model"].items() if k.startswith("policy.")}
        try:
            policy.net.load_state_dict(net)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: model: the networks do not fit its config: {e}") from None
        policy.normalizer.set_identity(("action",))  # robomimic's BC acts in [-1, 1] itself
        stats = ckpt.get("obs_normalization_stats") or {}
        policy.normalizer.set_mean_std({k: stats[k] for k in policy.obs_keys if k in stats})
        policy.normalizer.set_identity(tuple(k for k in policy.obs_keys if k not in stats))
        policy.info = {"imported_from": str(path), "robomimic_algo": type(policy._algo).__name__}
        return policy.eval()


def shared_aliases(module: torch.nn.Module) -> dict[str, str]:
    """``{alias key: first key}`` for the state-dict entries that are the same tensor."""
    first: dict[int, str] = {}
    aliases = {}
    for key, value in module.state_dict(keep_vars=True).items():
        aliases.update({key: first[id(value)]} if id(value) in first else {})
        first.setdefault(id(value), key)
    return aliases


def _drop_aliases(module: BCRNN, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for alias in module._aliases:
        state.pop(prefix + alias, None)


def _fill_aliases(module: BCRNN, state: dict[str, Any], prefix: str, *args: Any) -> None:
    for alias, key in module._aliases.items():
        if prefix + key in state:
            state.setdefault(prefix + alias, state[prefix + key])


def _state_batch(state: Any) -> int:
    return (state[0] if isinstance(state, tuple) else state).shape[1]


def _sample_gmm(dist: Any, generator: Generators) -> torch.Tensor:
    """One draw per row of robomimic's GMM (B, Da) through our per-sample generators."""
    probs = dist.mixture_distribution.probs
    loc, scale = dist.component_distribution.base_dist.loc, dist.component_distribution.base_dist.scale
    mode = multinomial(probs, 1, generator)[:, 0]
    rows = torch.arange(len(mode), device=loc.device)
    noise = randn(len(mode), loc.shape[-1], generator=generator, device=loc.device, dtype=loc.dtype)
    return loc[rows, mode] + scale[rows, mode] * noise
