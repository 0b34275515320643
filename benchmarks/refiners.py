"""Benchmark a DiffTORI training step against the official code's formulation.

    OMP_NUM_THREADS=1 python benchmarks/refiners.py [--batch-size 128] [--repeats 5]

Both use DP3-sized sizes: observation features 256 (two frames of 128), latent 64, an action window
of 4 x 4, hidden layers of 256. Prints JSON lines:

* ``untrained_jump``: how far an untrained DiffTORI's solve moves the base window (mean and max
  |refined - base|, normalised units) with ``objective_dim`` 16 (the window's size: a square
  system) or 48, with and without the anchor and bounded steps: why the defaults are what they are;
* ``control_step`` (with ``--demos --base --refiner``, trained checkpoints such as ``dvc repro``'s):
  refine latency with the LM iterations really taken, base latency and the total per control step,
  at batch 1 and 8 (``benchmarks/control_step.py``, which documents the fields);
* ``train_step``: forward + backward + Adam step at batch 128, for
  - ``difftori``: this package's refiner at the pipeline's default params (params.yaml), and
  - ``official``: the official formulation, written here from its description: the whole batch
    flattened into ONE Theseus problem over B*16 actions with the single residual
    ``1000 - mean(R)`` (actions clamped to [-1, 1] inside the cost), dense Cholesky, fixed damping
    0.01, step size 3e-5, at most 100 iterations with Theseus's default tolerances, truncated
    backward of 5 iterations, loss 3000 MSE + 10 KL;
  with the LM iterations each actually runs and how far it moves the initial actions.

``step_time_ratio`` is official / ours per training step. It is a cost ratio between two
formulations that do different amounts of work (different iteration counts and action movement,
both printed), not a speed-up of one algorithm. Untrained networks with an MLP stand-in for the
point encoder: the test-time cost of trained checkpoints is ``benchmarks/control_step.py``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from difftori.base_policies.base import ShapeMeta
from difftori.base_policies.configs import config_from_dict
from difftori.refiners import REFINERS
from difftori.refiners.difftori import DiffTORIConfig
from torch import nn

warnings.filterwarnings("ignore")
B_FEAT, LATENT, H, DA = 128, 64, 4, 4  # per-frame features, latent, window
SHAPE = ShapeMeta(obs={"state": {"shape": [B_FEAT], "kind": "lowdim"}}, action_dim=DA)
ENCODER = {"lowdim_hidden": [B_FEAT, B_FEAT]}  # 2 frames x 128 = 256 observation features


def ours(params: dict, **overrides: object) -> nn.Module:
    cfg = dict((params.get("refiner_configs") or {}).get("difftori") or {}) | overrides
    cfg |= {"horizon": H, "n_obs_steps": 2, "n_action_steps": 3, "encoder": ENCODER, "latent_dim": LATENT}
    config_from_dict(DiffTORIConfig, cfg)  # validate like the pipeline
    refiner = REFINERS.make("difftori", cfg, SHAPE)
    rng = np.random.default_rng(0)
    refiner.fit_normalizer({"state": rng.normal(size=(100, B_FEAT)), "action": rng.uniform(-1, 1, (100, DA))})
    return refiner


class Official(nn.Module):
    """The official DiffTORI MetaWorld refiner's formulation (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        feat, a = 2 * B_FEAT, H * DA
        self.encoder = nn.Sequential(
            nn.Linear(B_FEAT, B_FEAT), nn.ReLU(), nn.Linear(B_FEAT, B_FEAT), nn.ReLU()
        )
        self.posterior = nn.Sequential(
            nn.Linear(feat + a, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2 * LATENT)
        )
        self.reward = nn.Sequential(
            nn.Linear(feat + LATENT + a, 256), nn.ELU(), nn.Linear(256, 256), nn.ELU(), nn.Linear(256, 1)
        )
        self.last_iterations = 0

    def loss(self, batch: dict, moved: list | None = None) -> torch.Tensor:
        import theseus as th

        obs = batch["obs"]["state"]
        z_s = self.encoder(obs.flatten(0, 1)).reshape(obs.shape[0], -1)
        expert = batch["action"].flatten(1)
        mu, logvar = self.posterior(torch.cat([z_s, expert], -1)).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        init = batch["init_action"][:, 0].flatten(1)
        n = init.shape[0]
        ctx = torch.cat([z_s, z], -1).reshape(1, -1)

        def err_fn(optim_vars: tuple, aux_vars: tuple) -> torch.Tensor:
            a = optim_vars[0].tensor.reshape(n, -1).clamp(-1, 1)
            c = aux_vars[0].tensor.reshape(n, -1)
            return (1000 - self.reward(torch.cat([c, a], -1)).mean()).reshape(1, 1)

        x = th.Vector(tensor=init.reshape(1, -1), name="a")
        aux = th.Variable(ctx, name="ctx")
        objective = th.Objective()
        objective.add(th.AutoDiffCostFunction([x], err_fn, 1, aux_vars=[aux], name="r"))
        opt = th.LevenbergMarquardt(objective, th.CholeskyDenseSolver, max_iterations=100, step_size=3e-5)
        sol, info = th.TheseusLayer(opt).forward(
            {"a": init.reshape(1, -1), "ctx": ctx},
            optimizer_kwargs={
                "damping": 0.01,
                "adaptive_damping": False,
                "backward_mode": "truncated",
                "backward_num_iterations": 5,
                "track_err_history": True,
            },
        )
        self.last_iterations = int(torch.isfinite(info.err_history).sum()) - 1
        refined = sol["a"].reshape(n, -1)
        if moved is not None:
            moved.append(float((refined - init).abs().mean()))
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1).mean()
        return 3000 * ((refined - expert) ** 2).mean() + 10 * kl


def batch(n: int, gen: torch.Generator) -> dict:
    action = torch.rand(n, H, DA, generator=gen) * 2 - 1
    init = (action + 0.1 * torch.randn(n, H, DA, generator=gen)).clamp(-1, 1)
    return {
        "obs": {"state": torch.randn(n, 2, B_FEAT, generator=gen)},
        "action": action,
        "init_action": init[:, None],
    }


def time_steps(module: nn.Module, loss_fn, b: dict, repeats: int) -> tuple[float, float]:
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss = loss_fn(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(loss)


def control_steps(demos: Path, base: Path, refiner: Path) -> None:
    """``benchmarks/control_step.py``'s lines for trained checkpoints, 10 DDIM steps, batch 1 and 8."""
    import subprocess
    import sys

    script = Path(__file__).with_name("control_step.py")
    cmd = [sys.executable, str(script), "--demos", str(demos), "--base", str(base), "--refiner", str(refiner)]
    subprocess.run(cmd, check=True)


@torch.no_grad()
def untrained_jumps(params: dict, b: dict) -> None:
    """One JSON line per (objective_dim, anchor, max_step_norm): the untrained solve's movement."""
    for dim in (16, 48):
        for weight in (0.0, 0.1):
            for bound in (0.0, 0.1):
                torch.manual_seed(0)
                trajopt = dict(params.get("refiner_configs", {}).get("difftori", {}).get("trajopt", {}))
                refiner = ours(
                    params,
                    objective_dim=dim,
                    anchor="base" if weight else "none",
                    proximity_weight=weight,
                    trajopt=trajopt | {"max_step_norm": bound},
                ).eval()
                init = b["init_action"][:, 0]
                out = refiner.refine(b["obs"], init, torch.Generator().manual_seed(0))
                move = (refiner.to_flat(out) - refiner.to_flat(init)).abs()
                row = {"objective_dim": dim, "proximity_weight": weight, "max_step_norm": bound}
                stats = {
                    "mean_abs_move": round(float(move.mean()), 4),
                    "max_abs_move": round(float(move.max()), 3),
                }
                print(json.dumps({"benchmark": "refiners/untrained_jump"} | row | stats), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--demos", type=Path, help="with --base and --refiner: also the control-step lines")
    p.add_argument("--base", type=Path, help="trained base checkpoint (e.g. models/<task>/dp3/seed0)")
    p.add_argument("--refiner", type=Path, help="trained DiffTORI checkpoint")
    args = p.parse_args()
    torch.set_num_threads(1)
    params = yaml.safe_load(args.params.read_text()) if args.params.exists() else {}
    gen = torch.Generator().manual_seed(0)
    b = batch(args.batch_size, gen)
    if args.demos and args.base and args.refiner:
        control_steps(args.demos, args.base, args.refiner)
    untrained_jumps(params, b)

    torch.manual_seed(0)
    refiner = ours(params)
    with torch.no_grad():
        z_s = refiner.encode_obs(b["obs"])
        init = refiner.to_flat(b["init_action"][:, 0])
        out, _ = refiner.decode(torch.randn(init.shape[0], LATENT), z_s, init, init)
        ours_moved = float((refiner.from_flat(out) - b["init_action"][:, 0]).abs().mean())
    ours_s, _ = time_steps(refiner.train(), refiner.compute_loss, b, args.repeats)
    ours_iters = refiner.last_iterations

    torch.manual_seed(0)
    official = Official()
    moved: list[float] = []
    official.loss(b, moved)
    official_s, _ = time_steps(official, official.loss, b, args.repeats)
    cfg = refiner.config.trajopt
    print(
        json.dumps(
            {
                "benchmark": "refiners/train_step",
                "batch_size": args.batch_size,
                "threads": 1,
                "difftori": {
                    "step_ms": round(1e3 * ours_s, 1),
                    "lm_iterations": ours_iters,
                    "max_iterations": cfg.max_iterations,
                    "backend": cfg.backend,
                    "backward_mode": cfg.backward_mode,
                    "mean_abs_action_change_at_init": round(ours_moved, 4),
                },
                "official": {
                    "step_ms": round(1e3 * official_s, 1),
                    "lm_iterations": official.last_iterations,
                    "max_iterations": 100,
                    "mean_abs_action_change_at_init": round(moved[0], 4),
                },
                "step_time_ratio": round(official_s / ours_s, 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
