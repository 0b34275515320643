"""Rollout evaluation of a base policy, alone or refined, in its simulator.

The env is the one the demos came from: the store's suite builds it from the store's metadata
(``Suite.env_for_store``: the same code and settings that made the demos, or the env a converted
file describes), wrapped in :class:`~difftori.eval.multistep.MultiStepWrapper` for the policy's
observation history and action chunks. The policy comes from a :class:`PolicyLoader`: a base
policy alone (:class:`BasePolicyLoader`), or whatever the caller composes (the pipeline passes a
refined one), so this package never imports the refiners.

Episode seeds are drawn from ``EvalConfig.seed`` alone (never a demo seed), so every method and
training seed is evaluated on the same initial states; the policy's sampling generator of an
episode is seeded with the episode's env seed. Success = the task's success flag at any step; the
result records the suite's table metric (success or failure rate).

Each worker process holds ``envs_per_worker`` envs and steps them together (one policy call per
control step, each episode with its own generator, so an episode does not depend on which others
share its batch; a freed env takes the next episode). :func:`make_eval_env` and
:func:`run_policy_episodes` run the same episodes in the calling process (e.g. during training).

Nothing is lost on a crash: ``out`` is locked for the run, its folder is checked writable before
the first rollout, every finished episode goes to a journal (:mod:`difftori.eval.journal`) from
which a re-run resumes, and the results file is written atomically.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from difftori.base_policies import load_policy
from difftori.datasets.episode_store import EpisodeStore, StoreMeta
from difftori.datasets.safeio import OutputLock, naming_path
from difftori.eval.journal import EvalJournal, check_writable, checkpoint_digest
from difftori.eval.multistep import MultiStepWrapper
from difftori.eval.results import EpisodeRecord, EvalResult
from difftori.eval.rollout import PolicyEpisodeBatch, envs_for, run_policy_episodes, write_video  # noqa: F401
from difftori.eval.suites import get_suite
from difftori.eval.workers import plan, run_in_workers

log = logging.getLogger(__name__)
BASE_LABELS = {
    "dp3": "DP3",
    "diffusion": "Diffusion Policy",
    "pointnet_bc": "PointNet-BC",
    "bc_rnn": "BC-RNN",
}


@dataclass(frozen=True)
class EvalConfig:
    """params.yaml ``evaluate``."""

    episodes: int = 20
    seed: int = 100  # the evaluation episode seeds are drawn from this
    max_episode_steps: int = 0  # 0: the suite's limit for the task
    workers: int = 2  # simulator processes
    envs_per_worker: int = 8  # envs per worker, stepped together (one policy call per control step)
    retries: int = 1  # a crashed episode is run once more, then recorded as an error
    videos: int = 0  # mp4 of the first k episodes
    weights: str = "ema"
    num_threads: int = 1  # torch threads per worker
    lazy_obs: bool = True  # skip observations no policy sees (identical results; False: benchmarks)
    backend: str = "processes"  # where episodes run: "processes" (local pool) or "ray" (eval.ray_workers)
    ray_address: str = ""  # backend "ray": a running cluster ("" = $RAY_ADDRESS, else a local instance)

    def __post_init__(self) -> None:
        counts = (self.episodes, self.workers, self.envs_per_worker)
        if min(counts) < 1 or self.retries < 0 or self.max_episode_steps < 0:
            raise ValueError(f"invalid evaluation config {self}")
        if self.backend not in ("processes", "ray"):
            raise ValueError(f"backend must be 'processes' or 'ray', got {self.backend!r}")
        if self.weights not in ("ema", "raw"):
            raise ValueError(f"weights must be 'ema' or 'raw', got {self.weights!r}")


def episode_seeds(seed: int, n: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct env seeds drawn from ``seed``, none in ``exclude`` (the demos' seeds)."""
    rng = np.random.default_rng([seed, 0xE7A1])
    out: list[int] = []
    while len(out) < n:
        s = int(rng.integers(0, 2**31 - 1))
        if s not in exclude and s not in out:
            out.append(s)
    return out


@dataclass
class LoadedPolicy:
    """A policy ready to roll out (eval mode), with what the results record about it."""

    policy: torch.nn.Module
    method: str  # its label in the tables, e.g. "DP3" or "DiffTORI + DP3"
    base: str  # the base policy's registered name
    refiner: str  # the refiner's registered name, or "none"
    weights: str  # the weights loaded, e.g. "ema" ("ema+raw" when they differ between parts)


class PolicyLoader(Protocol):
    """Picklable (worker processes call it): builds the policy to evaluate from checkpoints."""

    @property
    def checkpoints(self) -> dict[str, str | None]:
        """Checkpoint directories by part ({"base": ..., "refiner": ... or None})."""

    def __call__(self, weights: str = "ema") -> LoadedPolicy: ...


def base_label(name: str) -> str:
    """A base policy's label in the tables."""
    return BASE_LABELS.get(name, name)


@dataclass(frozen=True)
class BasePolicyLoader:
    """A base policy alone, from its checkpoint directory."""

    base: str

    @property
    def checkpoints(self) -> dict[str, str | None]:
        return {"base": self.base, "refiner": None}

    def __call__(self, weights: str = "ema") -> LoadedPolicy:
        policy = load_policy(self.base, weights)
        return LoadedPolicy(policy, base_label(policy.name), policy.name, "none", policy.weights)


def make_eval_env(
    meta: StoreMeta,
    max_episode_steps: int,
    n_obs_steps: int,
    keys: Sequence[str] | None = None,
    lazy: bool = True,
) -> MultiStepWrapper:
    """The evaluation env of a demo store (its suite's ``env_for_store``) with the step limit
    (0: the suite's for the task), in a ``MultiStepWrapper`` with ``n_obs_steps`` frames.

    ``keys`` limits the observation to what the policy reads (None: every key the store holds);
    ``lazy`` skips the observations that fall out of the history window before the policy sees
    them (identical observations, see ``MultiStepWrapper``).
    """
    suite = get_suite(meta.suite)
    steps = max_episode_steps or suite.max_episode_steps(meta.task)
    env = suite.env_for_store(meta, steps, list(keys) if keys is not None else None)
    return MultiStepWrapper(env, n_obs_steps, lazy=lazy)


@dataclass(frozen=True)
class PolicyEpisodes:
    """Builds, inside a worker, the policy and ``envs`` envs, and returns their episode batch."""

    meta: StoreMeta
    loader: PolicyLoader
    cfg: EvalConfig
    envs: int = 1
    video_dir: str | None = None

    def __call__(self) -> PolicyEpisodeBatch:
        torch.set_num_threads(self.cfg.num_threads)
        policy = self.loader(self.cfg.weights).policy
        envs = [
            make_eval_env(
                self.meta, self.cfg.max_episode_steps, policy.n_obs_steps, policy.obs_keys, self.cfg.lazy_obs
            )
            for _ in range(self.envs)
        ]
        return PolicyEpisodeBatch(envs, policy, self.cfg.videos, self.video_dir)


def evaluate(
    demos: Path,
    policy: PolicyLoader,
    seed: int,
    out: Path,
    cfg: EvalConfig,
    video_dir: Path | None = None,
    progress: bool = True,
    refiner_name: str | None = None,
    wait: bool = False,
) -> EvalResult:
    """Roll out ``policy``'s policy for ``cfg.episodes`` episodes and write the results to ``out``.

    ``seed`` is the training seed of the checkpoints (recorded). ``refiner_name`` is recorded as
    the refiner (default: the loaded one's registered name; a params variant such as ``ibc_alone``
    passes its own name). ``out`` is locked for the run (``wait``: queue behind another writer);
    an interrupted run resumes from its journal.
    """
    check_writable(out)  # before anything: a read-only or full folder fails at once
    with OutputLock(out, wait):
        return _evaluate(demos, policy, seed, out, cfg, video_dir, progress, refiner_name)


def _evaluate(
    demos: Path,
    loader: PolicyLoader,
    seed: int,
    out: Path,
    cfg: EvalConfig,
    video_dir: Path | None,
    progress: bool,
    refiner_name: str | None,
) -> EvalResult:
    meta = EpisodeStore(demos, check_values=False).meta
    suite = get_suite(meta.suite)
    cfg = replace(  # the suite's step limit and cap on envs per worker: the results record them
        cfg,
        max_episode_steps=cfg.max_episode_steps or suite.max_episode_steps(meta.task),
        envs_per_worker=min(cfg.envs_per_worker, suite.max_envs_per_worker or cfg.envs_per_worker),
    )
    loaded = loader(cfg.weights)  # fail here, clearly, not in the workers
    missing = [k for k in loaded.policy.obs_keys if k not in meta.obs_kinds]
    if missing:
        where = loader.checkpoints["base"]
        raise ValueError(f"{where}: the policy observes {missing[0]!r}, which {demos} does not hold")
    cfg = replace(cfg, envs_per_worker=envs_for(loaded.policy, cfg.envs_per_worker))  # recurrent: 1
    base_name, method, weights = loaded.base, loaded.method, loaded.weights
    refiner_name = refiner_name or loaded.refiner
    del loaded  # the workers load their own copies
    seeds = episode_seeds(cfg.seed, cfg.episodes, exclude=set(meta.episode_seeds))
    if video_dir is not None:
        video_dir.mkdir(parents=True, exist_ok=True)
    workers, per_worker = plan(len(seeds), cfg.workers, cfg.envs_per_worker)
    video = str(video_dir) if video_dir else None
    factory = PolicyEpisodes(meta, loader, cfg, per_worker, video)
    log.info(
        "evaluating %s on %s: %d episodes, %d workers x %d envs",
        method,
        meta.task,
        len(seeds),
        workers,
        per_worker,
    )
    journal = EvalJournal(out, _journal_header(meta, seeds, cfg, loader.checkpoints))
    finished = journal.start()
    records = _runner(cfg)(
        factory,
        seeds,
        workers,
        cfg.retries,
        f"{meta.task} {method}",
        progress,
        per_worker,
        on_record=journal.append,
        finished=finished,
    )
    result = EvalResult(
        suite=meta.suite,
        task=meta.task,
        base=base_name,
        refiner=refiner_name,
        seed=seed,
        method=method,
        metric=suite.metric,
        checkpoints=loader.checkpoints,
        config=asdict(cfg) | {"weights": weights},  # the weights loaded
        episodes=records,
    )
    with naming_path(out):  # a full disk names the file; the journal keeps every record
        result.write(out)
    journal.remove()
    _log_result(result, out)
    return result


def _runner(cfg: EvalConfig) -> Callable[..., list[EpisodeRecord]]:
    """The episode runner of ``cfg.backend``: the process pool, or Ray (local, or a cluster)."""
    if cfg.backend == "processes":
        return run_in_workers
    from difftori.eval.ray_workers import run_on_ray  # imports Ray only when asked for

    return functools.partial(run_on_ray, address=cfg.ray_address or os.environ.get("RAY_ADDRESS") or None)


def _journal_header(
    meta: StoreMeta, seeds: list[int], cfg: EvalConfig, checkpoints: dict[str, str | None]
) -> dict[str, Any]:
    """What determines an evaluation's records: a journal is resumed only if this is unchanged."""
    digests = {part: checkpoint_digest(Path(p)) if p else None for part, p in checkpoints.items()}
    return {
        "suite": meta.suite,
        "task": meta.task,
        "obs": meta.params.get("obs"),
        "seeds": seeds,
        "max_episode_steps": cfg.max_episode_steps,
        "weights": cfg.weights,
        "checkpoints": digests,
    }


def _log_result(result: EvalResult, out: Path) -> None:
    s = result.summary()
    lo, hi = s["wilson95"]
    shift = "" if s["action_shift_mean"] is None else f", refiner shift {s['action_shift_mean']:.4f}"
    log.info(
        "%s on %s: success %d/%d (%.1f%%, Wilson 95%% [%.1f, %.1f]), %d errors%s -> %s",
        *(result.method, result.task, s["successes"], s["n"], 100 * s["success_rate"]),
        *(100 * lo, 100 * hi, s["errors"], shift, out),
    )
