"""The ``inspect-refiner`` command: a picture of what a DiffTORI refiner does at one demo step.

In the spirit of the DiffTORI paper's Fig. 4. For a few prior latents ``z~ ~ N(0, I)`` (drawn as
``refine`` draws them, from one seeded generator: the start first when ``init`` is ``random``, then
the latents), it draws the learned objective ``sum_l gamma^l ||g_l||^2`` (the anchor rows excluded,
``objective_value``) on a 2-D slice of the normalised, flattened action window: two coordinates
``(i, j)`` vary over a grid, every other coordinate stays at the base window's (the slice passes
through the base window; for a planning horizon H > 1 the lookahead windows are copies of the slice
point, as LM's start is). Over it: the Levenberg-Marquardt path from the start to the solution
projected on ``(i, j)``, and markers for the base window, the start, the solution and the expert
window. Points off the slice (the path, the solution, the expert) are projections, so they need not
sit at the slice's minimum. When the refiner has ``anchor: base``, a second row draws the full cost
``||residual||^2`` (objective + anchor), so one sees whether the objective or the anchor does the work.

The LM path: iterate ``k`` is ``trajopt.solve`` with the refiner's solver settings but
``max_iterations=k`` and ``backward_mode="unroll"`` (no backward phase: plain LM iterations, which
are a prefix of the no-grad iterations of the full solve); the last point is the full solve
(``refiner.decode``'s solution, which ends with the backward mode's Gauss-Newton or fixed-damping
steps). The samples are solved together, one batch, as ``refine`` solves them.

Outputs: a PNG and a JSON of every number drawn beside it (``<out>.json``), each written to a
temporary name, then renamed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from difftori.base_policies.base import Obs
from difftori.datasets.episode_store import ACTION_KEY, EpisodeStore
from difftori.datasets.init_action_store import InitActionStore
from difftori.datasets.safeio import atomic_write, atomic_write_text
from difftori.datasets.windows import window_indices
from difftori.refiners import REFINERS
from difftori.refiners.difftori import DiffTORIRefiner
from difftori.refiners.trajopt import solve

log = logging.getLogger(__name__)

GRID = 41  # grid points per axis
SPAN = 1.5  # half-width of the slice around the base window, normalised units


def default_out(task: str, policy: str, refiner: str, seed: int, step: int) -> Path:
    """``results/inspect/<task>/<policy>-<refiner>/seed<k>/step<N>.png``."""
    return Path("results/inspect") / task / f"{policy}-{refiner}" / f"seed{seed}" / f"step{step}.png"


def most_varying_dims(windows: torch.Tensor) -> tuple[int, int]:
    """The two coordinates of flat windows (N, D) with the largest standard deviation, in order."""
    if windows.shape[1] < 2:
        raise ValueError(f"need a window of >= 2 coordinates to draw a 2-D slice, got {windows.shape[1]}")
    top = torch.topk(windows.std(0) if windows.shape[0] > 1 else torch.zeros(windows.shape[1]), 2).indices
    return int(top[0]), int(top[1])


def lm_path(refiner: DiffTORIRefiner, ctx: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """LM iterates (P, B, H*D) from ``x0 = start`` repeated H times to the full solve's solution.

    Iterate k (0 < k < P - 1) is ``solve`` with ``max_iterations=k`` and plain LM (``unroll``): the
    k-th no-grad iteration of the full solve; the last is the full solve, as ``decode`` runs it."""
    cfg = refiner.config.trajopt
    jac = refiner.residual_jacobian if refiner.config.planning_horizon == 1 else None
    x0 = start.repeat(1, refiner.config.planning_horizon)
    backward = 0 if cfg.backward_mode == "unroll" else cfg.grad_iterations
    plain = max(cfg.max_iterations - max(backward, 1), 0)  # LM iterations before the last point
    with torch.no_grad():
        points = [x0]
        for k in range(1, plain + 1):
            step_cfg = replace(cfg, max_iterations=k, backward_mode="unroll")
            points.append(solve(refiner.residual, x0, ctx, step_cfg, jacobian_fn=jac).x)
        points.append(solve(refiner.residual, x0, ctx, cfg, jacobian_fn=jac).x)
    return torch.stack(points)


def slice_axes(centre: np.ndarray, marks: np.ndarray, span: float, grid: int) -> list[np.ndarray]:
    """Grid coordinates per slice axis: ``centre +- span``, widened to hold every mark (M, 2) with a
    10% margin."""
    centre, marks = np.asarray(centre, np.float64), np.asarray(marks, np.float64)
    lo, hi = np.minimum(centre - span, marks.min(0)), np.maximum(centre + span, marks.max(0))
    pad = 0.1 * (hi - lo) * ((marks.min(0) < centre - span) | (marks.max(0) > centre + span))
    return [np.linspace(lo[a] - pad[a], hi[a] + pad[a], grid) for a in range(2)]


def slice_points(base: torch.Tensor, dims: tuple[int, int], u: np.ndarray, v: np.ndarray) -> torch.Tensor:
    """Windows (len(v) * len(u), D): ``base`` with coordinate ``dims[0]`` = u, ``dims[1]`` = v;
    row ``a * len(u) + b`` holds (u[b], v[a]) (a (v, u) image, as contour plots take it)."""
    vv, uu = np.meshgrid(v, u, indexing="ij")
    x = base.expand(uu.size, -1).clone()
    x[:, dims[0]] = torch.as_tensor(uu.ravel(), dtype=x.dtype)
    x[:, dims[1]] = torch.as_tensor(vv.ravel(), dtype=x.dtype)
    return x


def slice_costs(
    refiner: DiffTORIRefiner, points: torch.Tensor, ctx: torch.Tensor, anchored: bool
) -> torch.Tensor:
    """Cost (N,) at slice points (N, D) for one sample's context (1, C): the learned objective
    (``objective_value``), or with ``anchored`` the full ``||residual||^2`` (objective + anchor)."""
    x = points.repeat(1, refiner.config.planning_horizon)
    c = ctx.expand(x.shape[0], -1)
    with torch.no_grad():
        return (refiner.residual(x, c) ** 2).sum(-1) if anchored else refiner.objective_value(x, c)


def _draw(
    refiner: DiffTORIRefiner, obs: Obs, base_window: torch.Tensor, samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start (S, D), latents (S, latent), solver context (S, C)), drawn as ``refine`` draws them
    from ``Generator().manual_seed(seed)`` with ``samples`` prior samples."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z_lat, start = refiner.draw(base_window[None], samples, gen)
        z_s = refiner.encode_obs(obs).repeat_interleave(samples, 0)
        base = refiner.to_flat(base_window[None]).expand(samples, -1)
        return start, z_lat, refiner.context(z_lat, z_s, base)


def _records(
    refiner: DiffTORIRefiner,
    z_lat: torch.Tensor,
    ctx: torch.Tensor,
    path: torch.Tensor,
    dims: tuple[int, int],
    points: torch.Tensor,
    grid: int,
) -> list[dict[str, Any]]:
    """One JSON-ready record per sample (see :func:`inspect_window`) from its latent, context,
    LM path (P, S, H*D) and the slice points (grid * grid, D)."""
    with torch.no_grad():
        path_cost = torch.stack([(refiner.residual(p, ctx) ** 2).sum(-1) for p in path])
        objective = refiner.objective_value(path[-1], ctx)
    anchor = path_cost[-1] - objective  # the anchor rows' cost (0 without an anchor)
    proj = path[..., list(dims)]

    def costs(s: int, anchored: bool) -> list[list[float]] | None:
        if anchored and refiner.config.anchor != "base":
            return None
        return slice_costs(refiner, points, ctx[s : s + 1], anchored).view(grid, grid).tolist()

    return [
        {
            "latent": z_lat[s].tolist(),
            "start": proj[0, s].tolist(),
            "solution": proj[-1, s].tolist(),
            "solution_window": path[-1, s, : refiner.chunk_dim].tolist(),
            "path": proj[:, s].tolist(),
            "path_cost": path_cost[:, s].tolist(),
            "objective": costs(s, False),
            "anchored": costs(s, True),
            "final_objective": float(objective[s]),
            "final_anchor_cost": float(anchor[s]),
            "chosen": s == int(objective.argmin()),
        }
        for s in range(z_lat.shape[0])
    ]


def inspect_window(
    refiner: DiffTORIRefiner,
    obs: Obs,
    base_window: torch.Tensor,
    expert_window: torch.Tensor,
    dims: tuple[int, int],
    samples: int = 3,
    seed: int = 0,
    grid: int = GRID,
    span: float = SPAN,
) -> dict[str, Any]:
    """Every number the picture draws (JSON-ready), for one observation window (obs: {key: (1, To,
    ...)}) and its base and expert windows (H, Da, env units); coordinates are normalised.

    Top level: ``dims``, grid axes ``grid.u``/``grid.v`` (coordinates ``dims[0]``/``dims[1]``),
    ``base``/``expert`` projected on ``dims`` and as whole flat windows. Per sample (``samples``):
    ``latent``, ``start``/``solution``/``path`` projected, ``solution_window``, ``path_cost`` (full
    ``||residual||^2`` along the path), ``objective`` (learned objective on the grid, ``[v][u]``),
    ``anchored`` (objective + anchor on the grid; None with ``anchor: none``), ``final_objective``,
    ``final_anchor_cost`` and ``chosen`` (lowest final objective: what ``refine`` returns)."""
    dims = (int(dims[0]), int(dims[1]))
    if not all(0 <= d < refiner.chunk_dim for d in dims) or dims[0] == dims[1]:
        raise ValueError(f"dims {dims}: need two different coordinates in 0..{refiner.chunk_dim - 1}")
    if samples < 1 or grid < 2:
        raise ValueError(f"need samples >= 1 and grid >= 2, got {samples} and {grid}")
    base, expert = refiner.to_flat(base_window[None]), refiner.to_flat(expert_window[None])
    start, z_lat, ctx = _draw(refiner, obs, base_window, samples, seed)
    path = lm_path(refiner, ctx, start)
    proj = path[..., list(dims)]  # (P, S, 2): the first planning window's coordinates
    marks = torch.cat([proj.flatten(0, 1), base[:, list(dims)], expert[:, list(dims)]]).numpy()
    u, v = slice_axes(base[0, list(dims)].numpy(), marks, span, grid)
    records = _records(refiner, z_lat, ctx, path, dims, slice_points(base, dims, u, v), grid)
    flat = {"base": base[0], "expert": expert[0]}
    return {
        "dims": list(dims),
        "grid": {"u": u.tolist(), "v": v.tolist()},
        **{k: w[list(dims)].tolist() for k, w in flat.items()},
        **{f"{k}_window": w.tolist() for k, w in flat.items()},
        "anchor": refiner.config.anchor,
        "init": refiner.config.init,
        "seed": seed,
        "samples": records,
    }


# -- the picture ---------------------------------------------------------------------------------
def _axis_label(dim: int, action_dim: int) -> str:
    return f"a[{dim}] (window step {dim // action_dim}, action dim {dim % action_dim}), normalised"


def _panel(ax: Any, result: dict[str, Any], rec: dict[str, Any], key: str, title: str) -> None:
    """One slice: log10 cost image, the LM path and the markers."""
    u, v = result["grid"]["u"], result["grid"]["v"]
    z = np.log10(np.maximum(np.asarray(rec[key]), 1e-12))
    image = ax.contourf(u, v, z, levels=30, cmap="viridis")
    ax.figure.colorbar(image, ax=ax, label="log10 cost")
    path = np.asarray(rec["path"])
    ax.plot(*result["base"], "s", mfc="white", mec="black", ms=12, label="base")  # under the start
    ax.plot(*result["expert"], "X", mfc="gold", mec="black", ms=12, label="expert")  # under the solution
    ax.plot(path[:, 0], path[:, 1], "-o", color="tab:red", ms=3, lw=1.2, label="LM path")
    ax.plot(*rec["start"], "^", mfc="tab:green", mec="black", ms=7, label=f"start ({result['init']})")
    ax.plot(*rec["solution"], "*", mfc="tab:red", mec="black", ms=10, label="solution")
    ax.set_title(title, fontsize=9)


def plot(result: dict[str, Any], out: Path, title: str, action_dim: int) -> None:
    """Write the picture to ``out`` (PNG; a temporary name, then renamed): one column per sample,
    the learned objective on top, objective + anchor below when the refiner has an anchor."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = result["samples"]
    rows = [("objective", "objective")]
    rows += [("anchored", "objective + anchor")] if recs[0]["anchored"] is not None else []
    fig = Figure(figsize=(4.6 * len(recs), 4.0 * len(rows) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(recs), squeeze=False)
    for r, (key, what) in enumerate(rows):
        for s, rec in enumerate(recs):
            f, a = rec["final_objective"], rec["final_anchor_cost"]
            cost = f"objective {f:.3g}" + (f" + anchor {a:.3g}" if key == "anchored" else "")
            chosen = " (chosen)" if rec["chosen"] else ""
            _panel(axes[r, s], result, rec, key, f"z~ sample {s}{chosen}: {what}\nsolution {cost}")
            axes[r, s].set_xlabel(_axis_label(result["dims"][0], action_dim), fontsize=8)
            axes[r, s].set_ylabel(_axis_label(result["dims"][1], action_dim), fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


# -- the stage -----------------------------------------------------------------------------------
def _windows(store: EpisodeStore, steps: np.ndarray, n_obs_steps: int, horizon: int) -> np.ndarray:
    """Global step indices (N, H) of the windows anchored at global ``steps`` (clipped to episodes)."""
    ends = store.episode_ends
    episode = np.searchsorted(ends, steps, side="right")
    starts = np.concatenate([[0], ends[:-1]])
    return window_indices(steps, starts[episode], ends[episode], n_obs_steps, horizon)


def load_step(
    refiner: DiffTORIRefiner, store: EpisodeStore, inits: InitActionStore, step: int
) -> tuple[Obs, torch.Tensor, torch.Tensor, torch.Tensor]:
    """At global demo ``step``: (obs {key: (1, To, ...)}, base window (H, Da) = the first stored
    sample, expert window (H, Da), every step's expert window, flat and normalised (T, H*Da))."""
    c = refiner.config
    if not 0 <= step < store.n_steps:
        raise ValueError(f"{store.path}: step {step} out of range 0..{store.n_steps - 1}")
    if (inits.meta.horizon, inits.meta.n_obs_steps) != (c.horizon, c.n_obs_steps):
        raise ValueError(
            f"{inits.path}: windows H={inits.meta.horizon}, To={inits.meta.n_obs_steps}; the refiner's "
            f"are H={c.horizon}, To={c.n_obs_steps}"
        )
    inits.check_aligned(store)
    idx = _windows(store, np.arange(store.n_steps), c.n_obs_steps, c.horizon)
    actions = torch.as_tensor(np.asarray(store.array(ACTION_KEY)[:]), dtype=torch.float32)[idx]
    rows = idx[step, : c.n_obs_steps]
    obs = {}
    for k in refiner.obs_keys:
        block = np.asarray(store.array(k)[rows.min() : rows.max() + 1])
        obs[k] = torch.as_tensor(block[rows - rows.min()], dtype=torch.float32)[None]
    base = torch.as_tensor(np.asarray(inits.actions[step, 0]), dtype=torch.float32)
    with torch.no_grad():
        return obs, base, actions[step], refiner.to_flat(actions)


def inspect_refiner(
    checkpoint: Path,
    demos: Path,
    inits_path: Path,
    step: int,
    out: Path,
    dims: tuple[int, int] | None = None,
    samples: int = 3,
    seed: int = 0,
    title: str = "",
) -> dict[str, Any]:
    """Draw the refiner at ``checkpoint`` at global demo ``step`` to ``out`` (PNG) and ``out`` with
    suffix ``.json`` (the numbers); returns them. ``dims`` None: the two coordinates of the flat
    window that vary most across the demo store's expert windows."""
    inputs = {checkpoint: "refiner checkpoint", demos: "demo store", inits_path: "init-action store"}
    for path, what in inputs.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: {what} not found")
    refiner = REFINERS.load(checkpoint)
    if not isinstance(refiner, DiffTORIRefiner):
        raise ValueError(
            f"{checkpoint}: holds a {refiner.name!r} refiner; inspect-refiner draws DiffTORI's objective"
        )
    obs, base, expert, windows = load_step(refiner, EpisodeStore(demos), InitActionStore(inits_path), step)
    dims = dims or most_varying_dims(windows)
    result = inspect_window(refiner, obs, base, expert, dims, samples, seed)
    result |= {"checkpoint": str(checkpoint), "demos": str(demos), "init_actions": str(inits_path)}
    result["step"] = step
    for s, rec in enumerate(result["samples"]):
        log.info(
            "sample %d%s: final objective %.4g, anchor cost %.4g, %d path points",
            s,
            " (chosen)" if rec["chosen"] else "",
            rec["final_objective"],
            rec["final_anchor_cost"],
            len(rec["path"]),
        )
    plot(result, out, title or f"{checkpoint} at step {step}, dims {dims}", refiner.shape_meta.action_dim)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1))
    log.info("wrote %s and %s", out, out.with_suffix(".json"))
    return result
