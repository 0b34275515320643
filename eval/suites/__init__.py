"""Simulator suites: everything difftori knows about one simulator lives in ``eval/suites/<name>.py``.

A suite module builds one :class:`Suite` and registers it with ``SUITES.register``; nothing outside
that module names its simulator. The rest of difftori reaches a simulator only through these
fields:

* ``metric``: what its tables report, ``"success"`` (rate) or ``"failure"`` (rate);
* ``obs_config``: the dataclass of its observation options (params.yaml ``demos.obs``), validated
  with ``config_from_dict``; ``asdict`` of it is what a demo store records in ``params["obs"]``;
* ``tasks()``: its valid task names; ``max_episode_steps(task)``: its default step limit;
* ``write_demos(cfg, out, overwrite, resume)``: write a demo store for ``cfg`` (a
  :class:`~difftori.eval.demos.DemoConfig`) to ``out`` (the caller holds ``out``'s lock); a
  scripted-expert suite calls :func:`~difftori.eval.demos.record_expert_demos`;
* ``env_for_store(meta, max_episode_steps, keys)``: the gymnasium env that evaluates a policy
  trained on a store with metadata ``meta`` (the same code and settings that made the demos, or
  the env a converted file describes), observing only ``keys`` (None: every key of the store);
* ``max_envs_per_worker``: how many of its envs one evaluation worker process may hold (0: no
  limit; 1 for simulators that do not share a process safely, e.g. robosuite's OpenGL contexts).

Suite envs follow one contract: ``reset(seed=s)`` gives the same initial state for the same ``s``;
observations are dicts of numpy arrays with the store's keys; ``info["success"]`` flags success;
an episode terminates at success and is truncated at the step limit; ``obs_kinds`` and
``control_mode`` describe them for a store's metadata. An env may offer ``observe`` (False: the
next steps return ``{}`` without rendering; see ``MultiStepWrapper``).

Suite modules import their simulator lazily (inside functions), so the registry loads fast and a
machine without one simulator can still run the others.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import gymnasium as gym
    from difftori.datasets.episode_store import EpisodeStore, StoreMeta
    from difftori.eval.demos import DemoConfig

METRICS = ("success", "failure")


@dataclass(frozen=True)
class Suite:
    """One simulator suite (see the module docstring for the contract of each field)."""

    name: str
    metric: Literal["success", "failure"]
    obs_config: type
    tasks: Callable[[], list[str]]
    max_episode_steps: Callable[[str], int]
    write_demos: Callable[[DemoConfig, Path, bool, bool], EpisodeStore]
    env_for_store: Callable[[StoreMeta, int, Sequence[str] | None], gym.Env]
    max_envs_per_worker: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"suite {self.name}: metric must be one of {METRICS}, got {self.metric!r}")


class SuiteRegistry(dict[str, Suite]):
    """Suite name -> :class:`Suite`; unknown names list the registered ones."""

    def register(self, suite: Suite) -> Suite:
        self[suite.name] = suite
        return suite

    def get_suite(self, name: str) -> Suite:
        if name not in self:
            raise ValueError(f"unknown suite {name!r}; registered suites: {', '.join(sorted(self))}")
        return self[name]


SUITES = SuiteRegistry()


def get_suite(name: str) -> Suite:
    """The registered suite ``name`` (its module is imported on first use)."""
    _register_all()
    return SUITES.get_suite(name)


def suite_names() -> list[str]:
    _register_all()
    return sorted(SUITES)


def _register_all() -> None:
    """Import every module of this package once: suite modules register themselves on import."""
    if _LOADED:
        return
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    _LOADED.append(True)


_LOADED: list[bool] = []
