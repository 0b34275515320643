"""Synthetic one-step problems for refiners: a biased base policy, and bimodal experts."""

import numpy as np
import torch
from difftori.base_policies.base import ShapeMeta
from difftori.refiners import REFINERS

SHAPE = ShapeMeta(obs={"state": {"shape": [2], "kind": "lowdim"}}, action_dim=2)
WINDOW = {"horizon": 1, "n_obs_steps": 1, "n_action_steps": 1, "encoder": {"lowdim_hidden": [32, 32]}}
SMALL = {
    "difftori": WINDOW | {"hidden": [64, 64], "latent_dim": 4, "state_dim": 16, "objective_dim": 8},
    "residual": WINDOW | {"hidden": [64, 64]},
    "ibc": WINDOW | {"hidden": [64, 64], "dfo_noise": 0.05, "perturbed_negatives": 64},
}
BIAS = np.array([0.3, -0.2])


def expert_action(s: np.ndarray) -> np.ndarray:
    return 0.6 * np.tanh(2 * s)


def biased_data(n: int, seed: int) -> dict:
    """Expert a* = 0.6 tanh(2s); the base outputs a* + (0.3, -0.2) + N(0, 0.02^2)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1, 1, size=(n, 2))
    a = expert_action(s)
    base = a + BIAS + rng.normal(scale=0.02, size=a.shape)
    return _batch(s, a, base)


def bimodal_data(n: int, seed: int) -> dict:
    """Two expert actions per state, +m and -m with m = (0.6, 0.6); the base outputs their mean, 0."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1, 1, size=(n, 2))
    sign = rng.choice([-1.0, 1.0], size=(n, 1))
    a = sign * np.array([[0.6, 0.6]]) + 0 * s
    return _batch(s, a, np.zeros_like(a))


def _batch(s, a, base) -> dict:
    t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    return {"obs": {"state": t(s)[:, None]}, "action": t(a)[:, None], "init_action": t(base)[:, None, None]}


def make(name: str, data: dict, **overrides):
    refiner = REFINERS.make(name, SMALL[name] | overrides, SHAPE)
    stats = {
        "state": data["obs"]["state"][:, 0].numpy(),
        "action": np.concatenate([data["action"][:, 0].numpy(), data["init_action"][:, 0, 0].numpy()]),
    }
    refiner.fit_normalizer(stats)
    return refiner


def train(refiner, data: dict, steps: int, lr: float = 3e-3, batch: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(refiner.parameters(), lr=lr)
    n = data["action"].shape[0]
    refiner.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,))
        b = {
            "obs": {"state": data["obs"]["state"][idx]},
            "action": data["action"][idx],
            "init_action": data["init_action"][idx],
        }
        loss = refiner.compute_loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return refiner.eval()
