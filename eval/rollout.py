"""The one episode runner: :class:`PolicyEpisodeBatch` steps several envs with one policy call.

Evaluation runs it in worker processes (``difftori.eval.workers``) or in this process
(:func:`run_policy_episodes`, e.g. rollouts during training); demo generation runs a scripted
expert through it (:class:`ExpertPolicy`) and records the steps (``trajectories``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from difftori.datasets.episode_store import ACTION_KEY
from difftori.eval.results import EpisodeRecord
from tqdm import tqdm

log = logging.getLogger(__name__)

Act = Callable[[dict[str, np.ndarray]], np.ndarray]


class ExpertPolicy(torch.nn.Module):
    """A scripted expert ``act(obs) -> action`` (one env step, numpy) behind the policy contract,
    so demos run through the same :class:`PolicyEpisodeBatch` as evaluation: it observes one frame
    (``n_obs_steps = 1``) and returns chunks of one action, clipped to ``[low, high]`` (what the env
    executes and the store records; a scripted expert may ask for more than the bounds).
    """

    n_obs_steps = 1

    def __init__(self, act: Act, obs_keys: Sequence[str], low: np.ndarray, high: np.ndarray) -> None:
        super().__init__()
        self.act, self.obs_keys = act, list(obs_keys)
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)

    def reset(self) -> None:
        """At each episode start: an expert with a ``reset()`` (per-episode state) gets it called."""
        if callable(getattr(self.act, "reset", None)):
            self.act.reset()

    def predict_action(self, obs: dict[str, torch.Tensor], generators: Any = None) -> torch.Tensor:
        rows = []
        for i in range(len(next(iter(obs.values())))):
            one = {k: v[i, -1].numpy() for k, v in obs.items()}
            rows.append(np.clip(np.asarray(self.act(one), dtype=np.float32), self.low, self.high))
        return torch.from_numpy(np.stack(rows)[:, None])


@dataclass
class _Running:
    """An episode in progress in one env of a :class:`PolicyEpisodeBatch`."""

    episode: int
    seed: int
    obs: dict[str, np.ndarray]
    generator: torch.Generator
    start: float
    success: bool = False
    steps: int = 0
    ret: float = 0.0
    shifts: list[tuple[float, float]] = field(default_factory=list)
    seen: list[dict[str, np.ndarray]] = field(default_factory=list)  # recorded steps (demos)
    actions: list[np.ndarray] = field(default_factory=list)


class PolicyEpisodeBatch:
    """Several envs stepped together by one policy (the ``EpisodeBatch`` of evaluation workers).

    ``start`` resets a free env with the episode's seed and seeds the episode's own sampling
    generator with it; ``advance`` makes one ``predict_action`` call for every running episode
    (a list of their generators, so each episode's actions do not depend on its batch-mates) and
    executes each chunk in its env. A policy exposing ``last_action_shift`` (``RefinedPolicy``)
    has it averaged into the records. ``policy.reset()`` runs at each episode start; a recurrent
    policy (``policy.recurrent``: state carried from call to call) gets one env, so that its one
    batch row is always the same episode (:func:`envs_for`).
    The first ``videos`` episodes (by index) are saved as mp4 under ``video_dir``. With a dict
    ``trajectories``, every finished episode's steps go there by episode index, as
    ``{obs key: (T, ...), "action": (T, Da)}`` (the observation before each executed action; the
    policy must act one step per call, as :class:`ExpertPolicy` does).
    """

    def __init__(
        self,
        envs: list[Any],
        policy: Any,
        videos: int = 0,
        video_dir: str | Path | None = None,
        trajectories: dict[int, dict[str, np.ndarray]] | None = None,
    ) -> None:
        if not envs:
            raise ValueError("PolicyEpisodeBatch needs at least one env")
        if len(envs) > envs_for(policy, len(envs)):
            raise ValueError(f"a recurrent policy steps one env at a time, got {len(envs)}")
        self.envs, self.policy, self.trajectories = envs, policy, trajectories
        self.device = next(iter(policy.parameters()), torch.empty(0)).device  # observations go there
        self.videos, self.video_dir = videos, Path(video_dir) if video_dir is not None else None
        self._runs: list[_Running | None] = [None] * len(envs)

    @property
    def capacity(self) -> int:
        return len(self.envs)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._runs)

    def start(self, episode: int, seed: int) -> None:
        i = self._runs.index(None)  # ValueError when every env is busy
        env = self.envs[i]
        env.record_frames = self.video_dir is not None and episode < self.videos
        start = time.perf_counter()
        obs, _ = env.reset(seed=seed)
        self.policy.reset()
        self._runs[i] = _Running(episode, seed, obs, torch.Generator().manual_seed(seed), start)

    @torch.no_grad()
    def advance(self) -> list[EpisodeRecord]:
        idx = [i for i, r in enumerate(self._runs) if r is not None]
        runs = [self._runs[i] for i in idx]
        batch = {
            k: torch.from_numpy(np.stack([r.obs[k] for r in runs])).to(self.device)
            for k in self.policy.obs_keys
        }
        actions = self.policy.predict_action(batch, [r.generator for r in runs]).cpu().numpy()
        shift = getattr(self.policy, "last_action_shift", None)  # duck-typed: RefinedPolicy has it
        shifts = torch.stack([shift["mean"], shift["max"]], 1).tolist() if shift is not None else None
        finished = []
        for j, i in enumerate(idx):
            run = runs[j]
            if self.trajectories is not None:
                self._record(run, actions[j])
            run.obs, reward, terminated, truncated, info = self.envs[i].step(actions[j])
            run.ret += reward
            run.steps += info["steps"]
            run.success = run.success or info["success"]
            if shifts is not None:
                run.shifts.append(tuple(shifts[j]))
            if terminated or truncated:
                finished.append(self._finish(i))
        return finished

    @staticmethod
    def _record(run: _Running, chunk: np.ndarray) -> None:
        if len(chunk) != 1:
            raise ValueError(f"recording needs one action per policy call, got a chunk of {len(chunk)}")
        run.seen.append({k: v[-1] for k, v in run.obs.items()})
        run.actions.append(chunk[0])

    def _finish(self, i: int) -> EpisodeRecord:
        run, env = self._runs[i], self.envs[i]
        self._runs[i] = None
        shift = np.mean(run.shifts, axis=0).tolist() if run.shifts else [None, None]
        record = EpisodeRecord(
            run.episode,
            run.seed,
            success=run.success,
            steps=run.steps,
            ret=run.ret,
            wall_s=time.perf_counter() - run.start,
            action_shift_mean=shift[0],
            action_shift_max=shift[1],
        )
        if self.trajectories is not None:
            steps = {k: np.stack([o[k] for o in run.seen]) for k in run.seen[0]}
            self.trajectories[run.episode] = steps | {ACTION_KEY: np.stack(run.actions)}
        if env.record_frames:
            path = self.video_dir / f"episode{run.episode:03d}_seed{run.seed}.mp4"
            try:
                write_video(path, env.frames)
            except (OSError, RuntimeError, ValueError) as e:  # a video never costs the episode
                log.warning("%s: video not written: %s", path, e)
            env.frames = []
        return record


def envs_for(policy: Any, n: int) -> int:
    """How many of ``n`` envs one :class:`PolicyEpisodeBatch` of ``policy`` may step: 1 for a
    recurrent policy (its state is one episode's), else ``n``."""
    return 1 if getattr(policy, "recurrent", False) else n


def run_policy_episodes(
    envs: list[Any],
    policy: Any,
    jobs: list[tuple[int, int]],
    progress: bool = False,
    trajectories: dict[int, dict[str, np.ndarray]] | None = None,
) -> list[EpisodeRecord]:
    """Roll ``policy`` out in this process for every job ``(episode index, env seed)``, stepping
    the ``envs`` (``MultiStepWrapper``s, e.g. from ``make_eval_env``) together; a freed env takes
    the next job. Records come back in the order of ``jobs``. The episodes and their records are
    those of ``difftori evaluate`` for the same seeds (no worker processes, retries or videos);
    the caller puts the policy in eval mode and on its device (observations are moved there; the
    per-episode generators stay on the CPU, as in evaluation). ``trajectories``: see
    :class:`PolicyEpisodeBatch`.
    """
    batch, todo = PolicyEpisodeBatch(envs, policy, trajectories=trajectories), deque(jobs)
    records: dict[int, EpisodeRecord] = {}
    with tqdm(total=len(jobs), desc="episodes", unit="ep", disable=not progress) as bar:
        while todo or batch.running:
            while todo and batch.running < batch.capacity:
                batch.start(*todo.popleft())
            for record in batch.advance():
                records[record.episode] = record
                bar.update(1)
    return [records[episode] for episode, _ in jobs]


def write_video(path: Path, frames: list[np.ndarray], fps: int = 30) -> None:
    """Frames (H, W, 3) uint8 to an H.264 mp4 (imageio-ffmpeg), atomically."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.mp4")
    with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)
    tmp.replace(path)
