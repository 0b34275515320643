"""Phase-based scripted experts for robosuite's Lift, PickPlaceCan and NutAssemblySquare (Panda,
OSC_POSE, delta input).

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

:class:`SquareExpert` (NutAssemblySquare) also turns the gripper about the vertical: it grasps the
nut's handle (``SquareNut_pos`` + the nut's rotation ``SquareNut_quat`` applied to the handle
offset) with the fingers across it, lifts the nut above the peg, turns it square to the peg while
carrying its centre over the peg (fixed by the task, given to the constructor), and lowers it.
Quaternions are robosuite's (x, y, z, w).
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


def _rotate(q: np.ndarray, v: Sequence[float]) -> np.ndarray:
    """Rotate ``v`` by the unit quaternion ``q`` = (x, y, z, w)."""
    u, w = np.asarray(q[:3], dtype=np.float64), float(q[3])
    v = np.asarray(v, dtype=np.float64)
    return v + 2.0 * np.cross(u, np.cross(u, v) + w * v)


def _yaw(q: np.ndarray, axis: Sequence[float]) -> float:
    """Heading in the horizontal plane of the body axis ``axis`` of a frame with rotation ``q``."""
    v = _rotate(q, axis)
    return float(np.arctan2(v[1], v[0]))


def _wrap(angle: float, period: float) -> float:
    return (angle + period / 2) % period - period / 2


class SquareExpert:
    """NutAssemblySquare: grasp the handle, carry the nut over the square peg, lower it onto it."""

    HANDLE = (0.054, 0.0, 0.0)  # handle_site in the nut's frame (robosuite's square-nut.xml)
    LIFT = 0.16  # lift height above the grasp (the peg top is 13 cm above the table)

    def __init__(
        self, peg: Sequence[float], table_z: float, gain: float = 12.0, turn_gain: float = 1.5
    ) -> None:
        self.peg = np.asarray(peg, dtype=np.float64)
        self.table_z = float(table_z)
        self.gain, self.turn_gain = gain, turn_gain
        self.reset()

    def reset(self) -> None:
        self.phase = "reach"
        self._steps = 0
        self._lift_z = 0.0

    def _next(self, phase: str) -> None:
        self.phase, self._steps = phase, 0

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        missing = sorted({"robot0_eef_pos", "robot0_eef_quat", "SquareNut_pos", "SquareNut_quat"} - set(obs))
        if missing:
            raise KeyError(f"observation lacks {missing}; keys: {sorted(obs)}")
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        self._steps += 1
        if self.phase in ("reach", "descend", "grasp"):
            err, turn, grip = self._pick(obs, eef)
        else:
            err, turn, grip = self._place(obs, eef)
        action = np.zeros(ACTION_DIM)
        action[:3] = np.clip(self.gain * err, -1.0, 1.0)
        action[5] = np.clip(self.turn_gain * turn, -1.0, 1.0)
        action[6] = grip
        return action

    def _pick(self, obs: dict[str, np.ndarray], eef: np.ndarray) -> tuple[np.ndarray, float, float]:
        q_nut = obs["SquareNut_quat"]
        handle = np.asarray(obs["SquareNut_pos"], dtype=np.float64) + _rotate(q_nut, self.HANDLE)
        # The fingers close along the gripper's y axis: align it with the nut's y (across the handle).
        turn = _wrap(_yaw(q_nut, (0, 1, 0)) - _yaw(obs["robot0_eef_quat"], (0, 1, 0)), np.pi)
        err = handle + (0.0, 0.0, 0.08 if self.phase == "reach" else 0.0) - eef
        dist = float(np.linalg.norm(err))
        if self.phase == "reach" and ((dist < 0.01 and abs(turn) < 0.05) or self._steps > 100):
            self._next("descend")
        elif self.phase == "descend" and (dist < 0.005 or self._steps > 60):
            self._next("grasp")
        elif self.phase == "grasp" and self._steps >= 15:
            self._lift_z = eef[2] + self.LIFT
            self._next("lift")
            return err, turn, _CLOSE
        return err, turn, _CLOSE if self.phase == "grasp" else _OPEN

    def _place(self, obs: dict[str, np.ndarray], eef: np.ndarray) -> tuple[np.ndarray, float, float]:
        nut = np.asarray(obs["SquareNut_pos"], dtype=np.float64)
        shift = self.peg[:2] - nut[:2]  # moving the gripper by this puts the nut over the peg
        turn = 0.0
        if self.phase in ("carry", "lower"):  # square the nut to the peg (90-degree symmetric)
            turn = _wrap(-_yaw(obs["SquareNut_quat"], (1, 0, 0)), np.pi / 2)
        err = np.zeros(3)
        if self.phase == "lift":
            err[2] = self._lift_z - eef[2]
            if abs(err[2]) < 0.02 or self._steps > 60:
                self._next("carry")
        elif self.phase == "carry":
            err[:2], err[2] = shift, self._lift_z - eef[2]
            if (np.linalg.norm(shift) < 0.004 and abs(turn) < 0.03) or self._steps > 150:
                self._next("lower")
        elif self.phase == "lower":
            err[:2] = shift
            if np.linalg.norm(shift) < 0.006:  # descend only while centred over the peg
                err[2] = max(self.table_z + 0.01 - nut[2], -0.05)
            if nut[2] < self.table_z + 0.03 or self._steps > 100:
                self._next("release")
        elif self.phase == "release":
            if self._steps >= 10:
                self._next("retreat")
            return err, turn, _OPEN
        else:  # retreat
            err[2] = 0.05
            return err, turn, _OPEN
        return err, turn, _CLOSE


def square_expert(peg: Sequence[float], table_z: float) -> SquareExpert:
    """Put the square nut on the square peg at ``peg`` (world position of its body)."""
    return SquareExpert(peg, table_z)
