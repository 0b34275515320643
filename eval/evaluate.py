"""Rollout evaluation of a base policy, alone or refined, in its simulator.

The env is the one the demos came from (suite, task and observation settings are read from the
demo store's metadata, so evaluation sees the world through the same code and settings), wrapped
in :class:`~difftori.eval.envs.multistep.MultiStepWrapper` for the policy's observation history and
action chunks. Episode seeds are drawn from ``EvalConfig.seed`` alone (never a demo seed), so every
method and training seed is evaluated on the same initial states; the policy's sampling generator
of an episode is seeded with the episode's env seed. Success = the task's success flag at any step.

Each worker process holds ``envs_per_worker`` envs and steps them together (one policy call per
control step, each episode with its own generator, so an episode does not depend on which others
share its batch; a freed env takes the next episode). :func:`make_eval_env` and
:func:`run_policy_episodes` run the same episodes in the calling process (e.g. during training).

Nothing is lost on a crash: ``out`` is locked for the run, its folder is checked writable before
the first rollout, every finished episode goes to a journal (:mod:`difftori.eval.journal`) from
which a re-run resumes, and the results file is written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from difftori.base_policies import load_policy
from difftori.datasets.episode_store import EpisodeStore, StoreMeta
from difftori.datasets.safeio import OutputLock, naming_path
from difftori.eval.envs import make_env
from difftori.eval.envs.multistep import MultiStepWrapper
from difftori.eval.journal import EvalJournal, check_writable, checkpoint_digest
from difftori.eval.results import EvalResult
from difftori.eval.rollout import PolicyEpisodeBatch, run_policy_episodes, write_video  # noqa: F401
from difftori.eval.workers import plan, run_in_workers
from difftori.refiners import REFINERS, RefinedPolicy

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
    max_episode_steps: int = 200  # MetaWorld's limit in DP3 and DiffTORI
    workers: int = 2  # simulator processes
    envs_per_worker: int = 8  # envs per worker, stepped together (one policy call per control step)
    retries: int = 1  # a crashed episode is run once more, then recorded as an error
    videos: int = 0  # mp4 of the first k episodes
    weights: str = "ema"
    num_threads: int = 1  # torch threads per worker
    lazy_obs: bool = True  # skip observations no policy sees (identical results; False: benchmarks)

    def __post_init__(self) -> None:
        counts = (self.episodes, self.workers, self.envs_per_worker, self.max_episode_steps)
        if min(counts) < 1 or self.retries < 0:
            raise ValueError(f"invalid evaluation config {self}")
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


def load_eval_policy(base: Path, refiner: Path | None, weights: str = "ema") -> tuple[torch.nn.Module, str]:
    """The policy to roll out (base, or ``RefinedPolicy``) and its method label for the tables."""
    policy = load_policy(base, weights)
    label = BASE_LABELS.get(policy.name, policy.name)
    if refiner is None:
        return policy, label
    ref = REFINERS.load(refiner, weights)
    return RefinedPolicy(policy, ref).eval(), ref.method_label(label)


def make_eval_env(
    meta: StoreMeta,
    max_episode_steps: int,
    n_obs_steps: int,
    keys: Sequence[str] | None = None,
    lazy: bool = True,
) -> MultiStepWrapper:
    """The evaluation env of a demo store: its suite, task and observation settings from the
    store's metadata, the step limit, in a ``MultiStepWrapper`` with ``n_obs_steps`` frames.

    ``keys`` limits the observation to what the policy reads (None: every key the store holds);
    ``lazy`` skips the observations that fall out of the history window before the policy sees
    them (identical observations, see ``MultiStepWrapper``).
    """
    options: dict[str, Any] = {"obs": meta.params["obs"]} if "obs" in meta.params else {}
    if keys is not None:
        options["keys"] = list(keys)
    env = make_env(meta.suite, meta.task, **options, max_episode_steps=max_episode_steps)
    return MultiStepWrapper(env, n_obs_steps, lazy=lazy)


@dataclass(frozen=True)
class PolicyEpisodes:
    """Builds, inside a worker, the policy and ``envs`` envs, and returns their episode batch."""

    meta: StoreMeta
    base: str
    refiner: str | None
    cfg: EvalConfig
    envs: int = 1
    video_dir: str | None = None

    def __call__(self) -> PolicyEpisodeBatch:
        torch.set_num_threads(self.cfg.num_threads)
        policy, _ = load_eval_policy(
            Path(self.base), Path(self.refiner) if self.refiner else None, self.cfg.weights
        )
        envs = [
            make_eval_env(
                self.meta, self.cfg.max_episode_steps, policy.n_obs_steps, policy.obs_keys, self.cfg.lazy_obs
            )
            for _ in range(self.envs)
        ]
        return PolicyEpisodeBatch(envs, policy, self.cfg.videos, self.video_dir)


def evaluate(
    demos: Path,
    base: Path,
    refiner: Path | None,
    seed: int,
    out: Path,
    cfg: EvalConfig,
    video_dir: Path | None = None,
    progress: bool = True,
    refiner_name: str | None = None,
    wait: bool = False,
) -> EvalResult:
    """Roll out the (refined) policy for ``cfg.episodes`` episodes and write the results to ``out``.

    ``refiner_name`` is recorded as the refiner (default: the refiner's registered name; a params
    variant such as ``ibc_alone`` passes its own name). ``out`` is locked for the run (``wait``:
    queue behind another writer); an interrupted run resumes from its journal.
    """
    check_writable(out)  # before anything: a read-only or full folder fails at once
    with OutputLock(out, wait):
        return _evaluate(demos, base, refiner, seed, out, cfg, video_dir, progress, refiner_name)


def _evaluate(
    demos: Path,
    base: Path,
    refiner: Path | None,
    seed: int,
    out: Path,
    cfg: EvalConfig,
    video_dir: Path | None,
    progress: bool,
    refiner_name: str | None,
) -> EvalResult:
    meta = EpisodeStore(demos, check_values=False).meta
    policy, method = load_eval_policy(base, refiner, cfg.weights)  # fail here, clearly, not in workers
    missing = [k for k in policy.obs_keys if k not in meta.obs_kinds]
    if missing:
        raise ValueError(f"{base}: the policy observes {missing[0]!r}, which {demos} does not hold")
    is_refined = isinstance(policy, RefinedPolicy)
    base_name = policy.base.name if is_refined else policy.name
    refiner_name = refiner_name or (policy.refiner.name if is_refined else "none")
    loaded = sorted({policy.base.weights, policy.refiner.weights} if is_refined else {policy.weights})
    del policy
    seeds = episode_seeds(cfg.seed, cfg.episodes, exclude=set(meta.episode_seeds))
    if video_dir is not None:
        video_dir.mkdir(parents=True, exist_ok=True)
    workers, per_worker = plan(len(seeds), cfg.workers, cfg.envs_per_worker)
    video = str(video_dir) if video_dir else None
    factory = PolicyEpisodes(meta, str(base), str(refiner) if refiner else None, cfg, per_worker, video)
    log.info(
        "evaluating %s on %s: %d episodes, %d workers x %d envs",
        method,
        meta.task,
        len(seeds),
        workers,
        per_worker,
    )
    journal = EvalJournal(out, _journal_header(meta, seeds, cfg, base, refiner))
    finished = journal.start()
    records = run_in_workers(
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
        checkpoints={"base": str(base), "refiner": str(refiner) if refiner else None},
        config=asdict(cfg) | {"weights": "+".join(loaded)},  # the weights loaded
        episodes=records,
    )
    with naming_path(out):  # a full disk names the file; the journal keeps every record
        result.write(out)
    journal.remove()
    _log_result(result, out)
    return result


def _journal_header(
    meta: StoreMeta, seeds: list[int], cfg: EvalConfig, base: Path, refiner: Path | None
) -> dict[str, Any]:
    """What determines an evaluation's records: a journal is resumed only if this is unchanged."""
    checkpoints = {
        "base": checkpoint_digest(base),
        "refiner": checkpoint_digest(refiner) if refiner else None,
    }
    return {
        "suite": meta.suite,
        "task": meta.task,
        "obs": meta.params.get("obs"),
        "seeds": seeds,
        "max_episode_steps": cfg.max_episode_steps,
        "weights": cfg.weights,
        "checkpoints": checkpoints,
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
