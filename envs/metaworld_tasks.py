"""Meta-World v3 tasks behind the same interface as our own tasks.

Each task is a :class:`MetaWorldEnv` (dict observations: ``state`` (39,) float32 always, ``image``
(S, S, 3) uint8 when asked; ``info["success"]``; terminates on success) and its scripted expert from
``metaworld.policies`` wrapped as a plain ``expert(obs, info) -> action`` callable.

Seeding. Meta-World's ``Meta-World/MT1`` draws 50 fixed object/goal configurations once (from the
benchmark seed) and picks one of them at random on every reset. We instead let every episode draw its
own configuration from the episode's seed (Meta-World's ``seeded_rand_vec`` mode — the same unlimited
randomisation as its goal-observable envs), so ``reset(seed=s)`` is reproducible and distinct seeds
give distinct configurations: training and evaluation seeds never share a scene by construction.
The goal position stays in the observation (``state[36:39]``), as in MT1.

Meta-World is imported inside the constructors, so ``import envs.metaworld_tasks`` (which the
registry does to list the tasks) stays cheap.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from envs.registry import Expert, TaskSpec, register_task
from envs.rendering import CameraSet, FastRenderer, image_cameras

STATE_DIM = 39
ACTION_DIM = 4
# Meta-World steps physics 5 x 2.5 ms per control step -> 80 control steps per second.
FPS = 80.0
MAX_EPISODE_STEPS = 500
# Cameras every Meta-World v3 scene defines; the first is the default for image observations
# ("corner" frames the workspace closest, so objects stay visible at 96 px).
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")


class MetaWorldEnv(gym.Env[dict[str, Any], np.ndarray]):
    """One Meta-World v3 environment (e.g. ``env_name="push-v3"``) with dict observations."""

    # gym.Env declares metadata as an instance variable; gym.make reads it from the class.
    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": FPS}  # noqa: RUF012

    def __init__(
        self,
        env_name: str,
        image: bool = False,
        camera: str | None = None,
        image_size: int = 96,
        render_mode: str | None = None,
        render_size: int = 256,
        cameras: Mapping[str, str] | None = None,
    ) -> None:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        if env_name not in ALL_V3_ENVIRONMENTS:
            raise ValueError(
                f"{env_name!r} is not a Meta-World v3 environment; known: {list(ALL_V3_ENVIRONMENTS)}"
            )
        camera = camera or CAMERAS[0]
        wanted = image_cameras(image, camera, cameras, CAMERAS)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode={render_mode!r}; expected None or 'rgb_array'")
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is too small; expected >= 8 pixels")

        mw = ALL_V3_ENVIRONMENTS[env_name]()
        # What MT1's set_task does, minus freezing the random vector: goal observable, task "set",
        # and object/goal positions drawn from the env's own seeded generator at every reset.
        mw._partially_observable = False
        del mw.sawyer_observation_space  # a cached property that depends on _partially_observable
        mw._set_task_called = True
        mw._freeze_rand_vec = False
        mw.seeded_rand_vec = True
        # Meta-World raises once it has run max_path_length steps; episode length is the TimeLimit's
        # job here (gym.make adds one from the task spec), so lift the inner limit.
        mw.max_path_length = sys.maxsize
        self._mw: Any = mw  # Meta-World's classes are only partly typed
        self.env_name = env_name

        self.camera = camera
        self.image_size = image_size
        self.render_mode = render_mode
        self.render_size = render_size
        mw_space = mw.sawyer_observation_space
        self._state_low = mw_space.low.astype(np.float32)
        self._state_high = mw_space.high.astype(np.float32)
        spaces: dict[str, gym.Space[Any]] = {
            "state": gym.spaces.Box(self._state_low, self._state_high, (STATE_DIM,), np.float32)
        }
        for key in wanted:
            spaces[key] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._cameras = CameraSet(mw.model, wanted, image_size, flip=True)  # Meta-World renders upside down
        self._view_renderer: FastRenderer | None = None
        self._steps = 0

    @property
    def model(self) -> Any:
        """The MuJoCo model (``mujoco.MjModel``) of the wrapped Meta-World env."""
        return self._mw.model

    @property
    def data(self) -> Any:
        """The MuJoCo data (``mujoco.MjData``) of the wrapped Meta-World env."""
        return self._mw.data

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        # Re-seed Meta-World's generator from ours on every reset: the scene then depends only on
        # (seed, number of resets since seeding), never on Meta-World's global np.random state.
        self._mw.seed(int(self.np_random.integers(2**31 - 1)))
        state, _ = self._mw.reset()
        self._steps = 0
        return self._observation(state), {"success": False, "steps": 0}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action has shape {action.shape}; expected ({ACTION_DIM},)")
        state, reward, _, _, mw_info = self._mw.step(action)
        self._steps += 1
        success = bool(mw_info["success"])
        info = {"success": success, "steps": self._steps}
        return self._observation(state), float(reward), success, False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        if self._view_renderer is None:
            self._view_renderer = FastRenderer(self._mw.model, self.render_size, self.camera, flip=True)
        return self._view_renderer.render(self._mw.data)

    def close(self) -> None:
        self._cameras.close()
        if self._view_renderer is not None:
            self._view_renderer.close()
        self._view_renderer = None
        self._mw.close()

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        # Meta-World clips step observations to its space but not the reset one; clip both.
        state = np.clip(state.astype(np.float32), self._state_low, self._state_high)
        return {"state": state, **self._cameras.render(self._mw.data)}


class MetaWorldExpert:
    """Meta-World's scripted policy for one task; reads only the 39-D state."""

    def __init__(self, env_name: str, seed: int = 0) -> None:
        from metaworld.policies import ENV_POLICY_MAP

        if env_name not in ENV_POLICY_MAP:
            raise ValueError(f"Meta-World ships no scripted policy for {env_name!r}")
        policy_class: Any = ENV_POLICY_MAP[env_name]  # typed as the abstract base class
        self._policy = policy_class()
        self.seed = seed  # the policies are deterministic; kept for the Expert factory contract

    def __call__(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray:
        with warnings.catch_warnings():
            # The policies warn whenever a proportional gain saturates; the env clips anyway.
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
            action = self._policy.get_action(obs["state"].astype(np.float64))
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)


# Meta-World's difficulty split (Seo et al. 2022, "Masked World Models"; the one DP3 and MP1 report
# per-category means by). Every v3 env not listed here is "easy".
CATEGORIES: dict[str, tuple[str, ...]] = {
    "medium": (
        "basketball-v3",
        "bin-picking-v3",
        "box-close-v3",
        "coffee-pull-v3",
        "coffee-push-v3",
        "hammer-v3",
        "peg-insert-side-v3",
        "push-wall-v3",
        "soccer-v3",
        "sweep-v3",
        "sweep-into-v3",
    ),
    "hard": (
        "assembly-v3",
        "hand-insert-v3",
        "pick-out-of-hole-v3",
        "pick-place-v3",
        "push-v3",
        "push-back-v3",
    ),
    "very_hard": ("shelf-place-v3", "disassemble-v3", "stick-pull-v3", "stick-push-v3", "pick-place-wall-v3"),
}


def category(env_name: str) -> str:
    """Meta-World's difficulty category of a v3 env name: easy, medium, hard or very_hard."""
    return next((name for name, envs in CATEGORIES.items() if env_name in envs), "easy")


# ---- the registered tasks: task name -> (Meta-World env name, success criterion) ----------------
# Only tasks whose scripted expert reaches >= 90% success over 50 seeded episodes are registered.
# Measured: seeds 0-49, 500-step limit, episodes ending on success (mujoco 3.3.0, metaworld 3.1.1;
# scripts/analysis/metaworld_experts.py, results/metaworld_experts.json). Left out at < 90%: soccer
# (82%), sweep-into (88%).
MEASURED_EXPERT_SUCCESS = {
    "mw_push": 50 / 50,
    "mw_pick_place": 50 / 50,
    "mw_drawer_open": 50 / 50,
    "mw_door_open": 48 / 50,
    "mw_button_press_topdown": 50 / 50,
    "mw_peg_insert_side": 45 / 50,
    "mw_hammer": 50 / 50,
    "mw_bin_picking": 50 / 50,
    "mw_assembly": 50 / 50,
    "mw_pick_out_of_hole": 50 / 50,
    "mw_shelf_place": 47 / 50,
    "mw_disassemble": 46 / 50,
    "mw_stick_pull": 48 / 50,
}
_TASKS: dict[str, tuple[str, str]] = {
    "mw_push": ("push-v3", "the puck is within 5 cm of the goal"),
    "mw_pick_place": ("pick-place-v3", "the block is within 7 cm of the goal in the air"),
    "mw_drawer_open": ("drawer-open-v3", "the drawer handle is within 3 cm of fully open"),
    "mw_door_open": ("door-open-v3", "the door handle is within 8 cm of its open position"),
    "mw_button_press_topdown": ("button-press-topdown-v3", "the button is pressed to within 2.4 cm"),
    "mw_peg_insert_side": ("peg-insert-side-v3", "the peg head is within 7 cm of the hole's far end"),
    "mw_hammer": ("hammer-v3", "the nail is driven more than 9 cm in"),
    "mw_bin_picking": ("bin-picking-v3", "the block is within 5 cm of its place in the other bin"),
    "mw_assembly": ("assembly-v3", "the nut is on the peg: within 3 cm sideways and 4 cm of its seat"),
    "mw_pick_out_of_hole": ("pick-out-of-hole-v3", "the peg is lifted out, within 7 cm of the goal"),
    "mw_shelf_place": ("shelf-place-v3", "the block is within 7 cm of its place on the shelf"),
    "mw_disassemble": ("disassemble-v3", "the nut is lifted above the top of the peg"),
    "mw_stick_pull": ("stick-pull-v3", "the stick, hooked in the handle, within 12 cm of the goal"),
}


def make_expert_for(task: str, seed: int = 0) -> Expert:
    """The scripted expert of a registered Meta-World task (``task`` as in ``_TASKS``)."""
    return MetaWorldExpert(_TASKS[task][0], seed)


def __getattr__(name: str) -> Any:
    # The expert entry points "envs.metaworld_tasks:make_<task>_expert" of the registered tasks (an
    # entry point names a module attribute; one factory serves them all).
    task = "mw_" + name.removeprefix("make_").removesuffix("_expert")
    if name.startswith("make_") and name.endswith("_expert") and task in _TASKS:
        return functools.partial(make_expert_for, task)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register() -> None:
    for task, (env_name, success) in _TASKS.items():
        register_task(
            TaskSpec(
                name=task,
                entry_point="envs.metaworld_tasks:MetaWorldEnv",
                expert_entry_point=f"envs.metaworld_tasks:make_{task.removeprefix('mw_')}_expert",
                state_dim=STATE_DIM,
                action_dim=ACTION_DIM,
                fps=FPS,
                max_episode_steps=MAX_EPISODE_STEPS,
                success=success,
                cameras=CAMERAS,
                # Meta-World's difficulty category as a tag: task_names("metaworld_hard") lists them.
                tags=("metaworld", f"metaworld_{category(env_name)}"),
                kwargs={"env_name": env_name},
            )
        )


_register()
