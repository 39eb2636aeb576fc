"""memory_cue — the memory task: remember which pad was lit at the start, then go there.

The arena has two rooms joined by a gate. The agent starts in the lower room; two target pads sit
in the upper room (left and right). During the first ``CUE_STEPS`` observations the correct pad is
lit (in the image) and named by a one-hot cue (in the state); afterwards both pads look the same
and the cue entries are zero. The agent must first drive through the gate — a cue-independent
phase that takes longer than the cue window and ends at the same place whatever the cue — and
then reach the correct pad. So at the decision point (just above the gate) the last few
observations carry no trace of the cue: a policy without memory of the episode's start is at
chance (50%).

Scene (metres, +x right and +y up in the ``top`` image): outer walls at |x|, |y| = 0.3, a middle
wall at y = 0 with a gate |x| < 0.04, pads of radius 0.035 centred at (-0.18, 0.18) and
(0.18, 0.18), pusher radius 0.015.

Action (2,): the pusher's commanded velocity in the plane, scaled so that 1 is 0.15 m/s.

State observation (6,) float32::

    [0:2] pusher x, y
    [2:4] pusher vx, vy
    [4:6] cue one-hot (left pad, right pad) while the cue is shown, zeros afterwards

Success: the pusher's centre within 0.035 m of the correct pad's centre (terminates). Reaching the
wrong pad terminates the episode as a failure. ``info`` adds ``cue`` (0 left, 1 right: the truth,
for analysis only — policies and the expert must read the cue from the observation),
``cue_visible`` and ``wrong_target``. ``reset(options={"cue": 0 | 1})`` forces the cue while
leaving every other random draw unchanged. Control at 10 Hz (timestep 0.005 s x 20 substeps).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from envs.base import MujocoTaskEnv
from envs.registry import Expert, TaskSpec, register_task

MAX_SPEED = 0.15  # m/s at |action| = 1; equals the actuators' ctrlrange
CUE_STEPS = 6  # observations 0 .. CUE_STEPS-1 show the cue
PAD_RADIUS = 0.035
PADS = np.array([[-0.18, 0.18], [0.18, 0.18]])  # index = cue value: 0 left, 1 right
LIT_RGBA = np.array([0.2, 0.85, 0.25, 1.0], dtype=np.float32)


class MemoryCueEnv(MujocoTaskEnv):
    """Pass the gate, then reach the pad that was lit during the first control steps."""

    xml_file: ClassVar[str] = "memory_cue.xml"
    state_dim: ClassVar[int] = 6
    action_dim: ClassVar[int] = 2

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Positions are read from qpos (displacement from the rest position in the MJCF), not
        # xpos: after mj_step, xpos still holds the start of the last substep.
        self._pusher_rest = np.array(self.model.body("pusher").pos[:2])
        start = int(self.model.joint("pusher_x").qposadr[0])
        self._pusher_qpos = slice(start, start + 2)
        start = int(self.model.joint("pusher_x").dofadr[0])
        self._pusher_qvel = slice(start, start + 2)
        self._pad_geoms = [int(self.model.geom(name).id) for name in ("pad_left", "pad_right")]
        self._neutral_rgba = self.model.geom_rgba[self._pad_geoms[0]].copy()
        self._forced_cue: int | None = None
        self.cue = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        cue = (options or {}).get("cue")
        if cue is not None and cue not in (0, 1):
            raise ValueError(f"reset option 'cue' must be 0 (left) or 1 (right); got {cue!r}")
        self._forced_cue = None if cue is None else int(cue)
        return super().reset(seed=seed, options=options)

    # ---- task hooks -------------------------------------------------------------------------
    def initialize_episode(self, rng: np.random.Generator) -> None:
        # Draw the cue first and always, so that forcing it leaves the start position unchanged.
        drawn = int(rng.integers(2))
        self.cue = drawn if self._forced_cue is None else self._forced_cue
        start = np.array([rng.uniform(-0.15, 0.15), rng.uniform(-0.22, -0.16)])
        self.data.qpos[self._pusher_qpos] = start - self._pusher_rest
        self._show_cue(True)

    def apply_action(self, action: np.ndarray) -> None:
        self.data.ctrl[:] = action * MAX_SPEED
        # The observation after this step has index steps + 1; the pads must look right in it.
        self._show_cue(self._steps + 1 < CUE_STEPS)

    def is_failure(self) -> bool:
        return self.at_wrong_pad()  # the wrong pad ends the episode as a failure

    def get_state(self) -> np.ndarray:
        cue = np.zeros(2)
        if self.cue_visible:
            cue[self.cue] = 1.0
        velocity = self.data.qvel[self._pusher_qvel]
        return np.concatenate([self.pusher_xy, velocity, cue]).astype(np.float32)

    def get_reward(self) -> float:
        return 1.0 if self.is_success() else 0.0

    def is_success(self) -> bool:
        return self._pad_distance(self.cue) <= PAD_RADIUS

    def task_info(self) -> dict[str, Any]:
        return {"cue": self.cue, "cue_visible": self.cue_visible, "wrong_target": self.at_wrong_pad()}

    # ---- physics accessors ------------------------------------------------------------------
    @property
    def cue_visible(self) -> bool:
        return self._steps < CUE_STEPS

    @property
    def pusher_xy(self) -> np.ndarray:
        xy: np.ndarray = self._pusher_rest + self.data.qpos[self._pusher_qpos]
        return xy

    def at_wrong_pad(self) -> bool:
        return self._pad_distance(1 - self.cue) <= PAD_RADIUS

    def _pad_distance(self, pad: int) -> float:
        return float(np.linalg.norm(self.pusher_xy - PADS[pad]))

    def _show_cue(self, visible: bool) -> None:
        for index, geom in enumerate(self._pad_geoms):
            lit = visible and index == self.cue
            self.model.geom_rgba[geom] = LIT_RGBA if lit else self._neutral_rgba


# ---- scripted expert ------------------------------------------------------------------------
# The cue-independent route: below the gate, then just above it (the decision point).
GATE_ROUTE = (np.array([0.0, -0.06]), np.array([0.0, 0.06]))
WAYPOINT_TOLERANCE = 0.015
GAIN = 8.0  # 1/s: commanded velocity per metre of position error


class MemoryCueExpert:
    """Reads the cue while it is shown, drives through the gate, then goes to the cued pad.

    Its motion before the decision point depends only on the pusher's position, never on the cue,
    so two episodes that differ only in the cue are identical until the agent stands above the gate.
    """

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._cue: int | None = None
        self._waypoint = 0

    def __call__(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray:
        state = np.asarray(obs["state"], dtype=np.float64)
        if state.shape != (MemoryCueEnv.state_dim,):
            raise ValueError(f"obs['state'] has shape {state.shape}; expected ({MemoryCueEnv.state_dim},)")
        if int(info["steps"]) == 0:
            self._cue = None
            self._waypoint = 0
        if state[4:6].any():
            self._cue = int(np.argmax(state[4:6]))
        pusher = state[0:2]
        while (
            self._waypoint < len(GATE_ROUTE)
            and np.linalg.norm(GATE_ROUTE[self._waypoint] - pusher) < WAYPOINT_TOLERANCE
        ):
            self._waypoint += 1
        if self._waypoint < len(GATE_ROUTE):
            target = GATE_ROUTE[self._waypoint]
        else:
            if self._cue is None:  # never saw the cue (joined mid-episode): guess
                self._cue = int(self._rng.integers(2))
            target = PADS[self._cue]
        velocity = GAIN * (target - pusher)
        speed = float(np.linalg.norm(velocity))
        if speed > MAX_SPEED:
            velocity *= MAX_SPEED / speed
        return (velocity / MAX_SPEED).astype(np.float32)


def make_expert(seed: int) -> Expert:
    return MemoryCueExpert(seed)


SPEC = TaskSpec(
    name="memory_cue",
    entry_point="envs.tasks.memory_cue:MemoryCueEnv",
    expert_entry_point="envs.tasks.memory_cue:make_expert",
    state_dim=MemoryCueEnv.state_dim,
    action_dim=MemoryCueEnv.action_dim,
    fps=MemoryCueEnv.fps,
    max_episode_steps=50,
    success="the agent reaches the pad that was lit at the start (reaching the other pad fails)",
    cameras=("top",),
    tags=("own", "memory"),
    # The cue is visible for the first CUE_STEPS steps and decides the target ~15 steps later; 32 is the
    # window the demo and the quality table train with.
    history_steps=32,
)
register_task(SPEC)
