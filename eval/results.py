"""The evaluation results file: one JSON per (task, base policy, refiner, training seed).

Layout (``format: difftori-eval``, ``version: 2``)::

    {"format": "difftori-eval", "version": 2,
     "suite": "<suite>", "task": "shelf-place", "base": "dp3", "refiner": "none", "seed": 0,
     "method": "DP3",                       # the row label of the report's tables
     "metric": "success",                   # the suite's table metric: "success" or "failure" rate
     "checkpoints": {"base": "...", "refiner": null},
     "config": {...},                       # the evaluation settings (EvalConfig)
     "episodes": [{"episode": 0, "env_seed": 123, "status": "ok", "success": true, "steps": 87,
                   "return": 512.3, "wall_s": 3.1, "attempts": 1, "error": null,
                   "action_shift_mean": 0.012, "action_shift_max": 0.05}, ...],
     "summary": {"n": 20, "successes": 9, "success_rate": 0.45, "wilson95": [0.26, 0.66],
                 "errors": 0, "wall_s": 61.0, "action_shift_mean": 0.011, "action_shift_max": 0.04}}

``action_shift_mean``/``action_shift_max`` (optional, null for an unrefined policy and in files
written before they existed): how far the refiner moved the executed actions from the base's, in
env units: per control step the mean and the max of |refined - base| over the executed actions,
averaged over the episode's control steps (and, in the summary, over the completed episodes).

Version 1 files (written when the only suite reported success rates) are read with
``metric: success``.

``status`` is ``ok`` or ``error`` (the episode crashed twice); errored episodes are not counted in
``n``: a crash is never recorded as a failure. :class:`EvalResult` is the only code that reads or
writes these files.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from difftori.datasets.safeio import atomic_write_text

FORMAT, VERSION = "difftori-eval", 2
READABLE_VERSIONS = (1, 2)
METRICS = ("success", "failure")
Z95 = 1.959963984540054  # two-sided 95% normal quantile


class ResultsError(ValueError):
    """A results file that is missing, unreadable or not in the expected layout."""


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when ``n == 0``."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class EpisodeRecord:
    episode: int
    env_seed: int
    status: str = "ok"  # "ok" or "error"
    success: bool = False
    steps: int = 0
    ret: float = 0.0
    wall_s: float = 0.0  # reset to end; episodes stepped together share these seconds
    attempts: int = 1
    error: str | None = None
    action_shift_mean: float | None = None  # refined policies only; see the module docstring
    action_shift_max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["return"] = d.pop("ret")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpisodeRecord:
        d = dict(d)
        d["ret"] = d.pop("return")
        return cls(**d)


@dataclass
class EvalResult:
    suite: str
    task: str
    base: str
    refiner: str  # "none" for the base policy alone
    seed: int  # the training seed of the evaluated checkpoints
    method: str
    metric: str = "success"  # what the tables report for this suite: "success" or "failure" rate
    checkpoints: dict[str, str | None] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    episodes: list[EpisodeRecord] = field(default_factory=list)

    # -- statistics -----------------------------------------------------------------------------
    @property
    def completed(self) -> list[EpisodeRecord]:
        return [e for e in self.episodes if e.status == "ok"]

    def summary(self) -> dict[str, Any]:
        ok = self.completed
        k = sum(e.success for e in ok)
        lo, hi = wilson_interval(k, len(ok))
        return {
            "n": len(ok),
            "successes": k,
            "success_rate": k / len(ok) if ok else float("nan"),
            "wilson95": [lo, hi],
            "errors": len(self.episodes) - len(ok),
            "wall_s": round(sum(e.wall_s for e in self.episodes), 2),
            "action_shift_mean": _mean([e.action_shift_mean for e in ok]),
            "action_shift_max": _mean([e.action_shift_max for e in ok]),
        }

    # -- the file -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"format": FORMAT, "version": VERSION}
        d |= {k: v for k, v in asdict(self).items() if k != "episodes"}
        d["episodes"] = [e.to_dict() for e in self.episodes]
        d["summary"] = self.summary()
        return d

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> EvalResult:
        """Load and validate; any problem raises :class:`ResultsError` naming the file and key."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except OSError as e:
            raise ResultsError(f"{path}: cannot read results file ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ResultsError(f"{path}: key 'format': expected {FORMAT!r}, got {_get(d, 'format')!r}")
        if d.get("version") not in READABLE_VERSIONS:
            raise ResultsError(
                f"{path}: key 'version': expected one of {READABLE_VERSIONS}, got {d.get('version')!r}"
            )
        metric = d.get("metric", "success") if d["version"] == 1 else d.get("metric")
        if metric not in METRICS:
            raise ResultsError(f"{path}: key 'metric': expected one of {METRICS}, got {metric!r}")
        expected = {"suite": str, "task": str, "base": str, "refiner": str, "seed": int, "method": str}
        for key, typ in expected.items():
            if not isinstance(d.get(key), typ):
                raise ResultsError(f"{path}: key {key!r}: expected {typ.__name__}, got {d.get(key)!r}")
        if not isinstance(d.get("episodes"), list):
            raise ResultsError(f"{path}: key 'episodes': expected a list of episode records")
        episodes = []
        for i, e in enumerate(d["episodes"]):
            try:
                rec = EpisodeRecord.from_dict(e)
            except (TypeError, KeyError, AttributeError) as err:
                raise ResultsError(f"{path}: key 'episodes[{i}]': not an episode record ({err})") from None
            if rec.status not in ("ok", "error") or not isinstance(rec.success, bool):
                raise ResultsError(f"{path}: key 'episodes[{i}]': bad status/success {e}")
            episodes.append(rec)
        kwargs = {k: d[k] for k in expected} | {
            "metric": metric,
            "checkpoints": d.get("checkpoints", {}),
            "config": d.get("config", {}),
        }
        return cls(**kwargs, episodes=episodes)


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values that are not None; None if there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None
