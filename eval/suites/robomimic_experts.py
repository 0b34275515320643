"""Phase-based scripted experts for robosuite's Lift and PickPlaceCan (Panda, OSC_POSE, delta input).

robosuite ships no scripted experts. These act on the observation dict alone (object position in
``<object>_pos``, or ``object[:3]`` in robomimic's observation; ``robot0_eef_pos``) and move
through phases with a proportional position command, the orientation command left at zero and
the gripper open (-1) or closed (+1):

* ``reach``: above the object; ``descend``: to the grasp height; ``grasp``: close for a few steps;
* ``lift``: straight up (Lift ends here);
* PickPlaceCan only: ``carry`` above the target bin, ``lower``, ``release``, ``retreat`` upwards
  (robosuite counts the can as placed only once the gripper is ~4 cm away from it).

A phase ends when its target is within a tolerance or after a step budget, so a slow phase
cannot stall the episode. The target bin of PickPlaceCan is fixed by the task (not in the
observation) and is given to the constructor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ACTION_DIM = 7  # OSC_POSE delta: dx, dy, dz, dax, day, daz, gripper
_OPEN, _CLOSE = -1.0, 1.0


@dataclass(frozen=True)
class _Phase:
    name: str
    offset: tuple[float, float, float]  # target = anchor + offset
    anchor: str  # "object", "grasp" (the object position when the grasp closed), "goal"
    gripper: float
    tol: float  # position tolerance (m); 0: run for max_steps
    max_steps: int


_PICK = (
    _Phase("reach", (0.0, 0.0, 0.08), "object", _OPEN, 0.01, 80),
    _Phase("descend", (0.0, 0.0, 0.0), "object", _OPEN, 0.006, 60),
    _Phase("grasp", (0.0, 0.0, 0.0), "object", _CLOSE, 0.0, 12),
)
_LIFT = (_Phase("lift", (0.0, 0.0, 0.15), "grasp", _CLOSE, 0.01, 80),)
_PLACE = (
    _Phase("lift", (0.0, 0.0, 0.12), "grasp", _CLOSE, 0.02, 60),
    _Phase("carry", (0.0, 0.0, 0.15), "goal", _CLOSE, 0.02, 120),
    _Phase("lower", (0.0, 0.0, 0.08), "goal", _CLOSE, 0.02, 40),
    _Phase("release", (0.0, 0.0, 0.08), "goal", _OPEN, 0.0, 10),
    _Phase("retreat", (0.0, 0.0, 0.25), "goal", _OPEN, 0.0, 1000),
)


class PhaseExpert:
    """Pick (and optionally place) one object; ``expert(obs) -> (7,)`` action in [-1, 1]."""

    def __init__(
        self,
        object_key: str,
        phases: Sequence[_Phase],
        goal: Sequence[float] | None = None,
        gain: float = 12.0,
    ) -> None:
        self.object_key = object_key
        self.phases = tuple(phases)
        self.goal = None if goal is None else np.asarray(goal, dtype=np.float64)
        self.gain = gain
        self.reset()

    def reset(self) -> None:
        self._phase = 0
        self._steps = 0
        self._grasp: np.ndarray | None = None

    @property
    def phase(self) -> str:
        return self.phases[min(self._phase, len(self.phases) - 1)].name

    def object_pos(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if self.object_key in obs:
            return np.asarray(obs[self.object_key], dtype=np.float64)[:3]
        if "object" in obs:
            return np.asarray(obs["object"], dtype=np.float64)[:3]
        raise KeyError(f"observation has neither '{self.object_key}' nor 'object'; keys: {sorted(obs)}")

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if "robot0_eef_pos" not in obs:
            raise KeyError(f"observation lacks 'robot0_eef_pos'; keys: {sorted(obs)}")
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        phase = self.phases[min(self._phase, len(self.phases) - 1)]
        target = self._anchor(phase.anchor, obs) + np.asarray(phase.offset)
        err = target - eef
        done_tol = phase.tol > 0 and np.linalg.norm(err) < phase.tol
        self._steps += 1
        if (done_tol or self._steps >= phase.max_steps) and self._phase < len(self.phases) - 1:
            if phase.name == "grasp":
                self._grasp = self.object_pos(obs)
            self._phase += 1
            self._steps = 0
        action = np.zeros(ACTION_DIM)
        action[:3] = np.clip(self.gain * err, -1.0, 1.0)
        action[6] = phase.gripper
        return action

    def _anchor(self, anchor: str, obs: dict[str, np.ndarray]) -> np.ndarray:
        if anchor == "object":
            return self.object_pos(obs)
        if anchor == "grasp":
            return self._grasp if self._grasp is not None else self.object_pos(obs)
        if self.goal is None:
            raise ValueError("this expert has no goal position")
        return self.goal


def lift_expert() -> PhaseExpert:
    """Grasp the cube and lift it (robosuite's Lift succeeds once it is 4 cm above the table)."""
    return PhaseExpert("cube_pos", _PICK + _LIFT)


def can_expert(goal: Sequence[float]) -> PhaseExpert:
    """Grasp the can and drop it into its bin; ``goal`` is the bin's centre (x, y, floor z)."""
    return PhaseExpert("Can_pos", _PICK + _PLACE, goal=goal)
