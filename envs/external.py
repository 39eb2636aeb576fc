"""Environments from outside the library, behind the env contract of the built-in tasks (docs/tasks.md).

A task reaches the registry from outside in one of three ways:

- ``task=gym:<id>``: any environment in gymnasium's registry (``gym:InvertedPendulum-v5``), its episode
  limit from the gymnasium spec;
- ``task=<module>:<factory>``: a function of the user's returning a gymnasium env;
- a module that calls ``register_task(external_task_spec(...))`` with a name, a success function and an
  expert of its own, imported with ``task_module=<module>`` or a ``scd_policy.tasks`` entry point.

The first two are resolved on demand by ``envs.registry.get_task`` under the task string itself. Either
way the env is wrapped in :class:`ExternalTaskEnv`, which gives it what the library relies on: dict
observations (a Box observation becomes ``state``; a Dict observation keeps its keys, renamable, with
low-dimensional arrays flattened and HWC uint8 arrays kept as images), actions in [-1, 1] mapped
linearly onto the env's finite Box bounds, ``info["success"]`` (from ``info["success"]`` /
``info["is_success"]`` or a user function; the episode ends at its first success, as for the built-in
tasks), ``info["steps"]``, and frames from the env's own ``render()`` only when images or videos are
asked for.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from envs.registry import TaskSpec
from envs.rendering import image_cameras

log = logging.getLogger(__name__)

GYM_PREFIX = "gym:"
RENDER_CAMERA = "render"  # an external env's one "camera": what its render() shows
DEFAULT_FPS = 10.0  # when the env states neither metadata["render_fps"] nor dt
DEFAULT_EPISODE_STEPS = 1000  # when neither the gymnasium spec nor the factory's env sets a limit
_OBJECT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")

# success_fn(obs, info) -> bool, with obs the adapted dict observation and info the env's own info.
SuccessFn = Callable[[dict[str, np.ndarray], dict[str, Any]], bool]


class ExternalTaskError(ValueError):
    """An external task cannot be built or does not fit the env contract; the message names the fix."""


def is_external_source(task: str) -> bool:
    """Whether a ``task=`` value names an env from outside (``gym:<id>`` or ``<module>:<factory>``)."""
    return task.startswith(GYM_PREFIX) or _OBJECT_PATH.fullmatch(task) is not None


def load_object(path: str, what: str) -> Any:
    """``"package.module:attribute"`` -> the attribute. The working directory is importable too (the
    console scripts do not put it on ``sys.path``; spawned workers inherit the parent's ``sys.path``)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ExternalTaskError(f"{what}={path!r}: expected '<module>:<name>', e.g. my_tasks:make_env")
    try:
        module = import_module(module_name)
    except ImportError as error:
        raise ExternalTaskError(
            f"{what}={path!r}: cannot import module {module_name!r} ({error}); put the module on "
            "PYTHONPATH or run the command from the folder that holds it"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ExternalTaskError(f"{what}={path!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def import_module(name: str) -> Any:
    """``importlib.import_module``, retried with the working directory on ``sys.path``."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        cwd = os.getcwd()
        top = name.split(".")[0]
        if error.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(name)


def _call_with_supported(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``factory`` with those of ``kwargs`` its signature accepts (all of them with ``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return factory(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return factory(**kwargs)
    names = {p.name for p in parameters}
    return factory(**{key: value for key, value in kwargs.items() if key in names})


def build_inner_env(source: str, render_mode: str | None, env_kwargs: Mapping[str, Any]) -> gym.Env[Any, Any]:
    """The user's env, as ``source`` names it (``gym:<id>`` or ``<module>:<factory>``)."""
    if source.startswith(GYM_PREFIX):
        env_id = source.removeprefix(GYM_PREFIX)
        try:
            return gym.make(env_id, render_mode=render_mode, **env_kwargs)
        except gym.error.Error as error:
            raise ExternalTaskError(f"task={source!r}: gymnasium cannot make {env_id!r}: {error}") from None
    factory = load_object(source, "task")
    if not callable(factory):
        raise ExternalTaskError(f"task={source!r} is not a function; expected a factory returning a gym.Env")
    env = _call_with_supported(factory, render_mode=render_mode, **env_kwargs)
    if not isinstance(env, gym.Env):
        raise ExternalTaskError(
            f"task={source!r} returned {type(env).__name__}, not a gymnasium.Env; the factory must "
            "return an env (gymnasium.Env subclass or gym.make(...))"
        )
    return env


def _image_like(space: gym.spaces.Box) -> bool:
    return len(space.shape) == 3 and space.shape[-1] in (1, 3, 4) and space.dtype == np.uint8


def _adapted_spaces(
    space: gym.Space[Any], rename: Mapping[str, str], source: str
) -> dict[str, gym.spaces.Box]:
    """The adapted observation's keys and spaces: low-dimensional arrays flattened to float32 vectors,
    HWC uint8 arrays kept as images."""
    if isinstance(space, gym.spaces.Box):
        items: list[tuple[str, gym.Space[Any]]] = [("state", space)]
    elif isinstance(space, gym.spaces.Dict):
        items = [(rename.get(key, key), sub) for key, sub in space.spaces.items()]
    else:
        raise ExternalTaskError(
            f"task={source!r}: observation space {space} is neither a Box nor a Dict of Boxes; wrap the env "
            "(gymnasium.wrappers.FlattenObservation flattens Tuple/Discrete spaces) so that it is"
        )
    spaces: dict[str, gym.spaces.Box] = {}
    for key, sub in items:
        if not isinstance(sub, gym.spaces.Box):
            raise ExternalTaskError(
                f"task={source!r}: observation key {key!r} has space {sub}; only Box entries are supported "
                "(flatten nested Dict/Tuple spaces with gymnasium.wrappers.FlattenObservation)"
            )
        if key in spaces:
            raise ExternalTaskError(f"task={source!r}: two observation keys are renamed to {key!r}")
        if _image_like(sub):
            spaces[key] = sub
        else:
            size = int(np.prod(sub.shape)) if sub.shape else 1
            spaces[key] = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
    return spaces


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    """An RGB frame (H, W, 3) uint8 -> (size, size, 3), area-averaged when shrinking."""
    if frame.shape[0] == size and frame.shape[1] == size:
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


class ExternalTaskEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """A user's gymnasium env behind the built-in tasks' contract (see the module docstring)."""

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": DEFAULT_FPS}  # noqa: RUF012

    def __init__(
        self,
        source: str,
        rename: Mapping[str, str] | None = None,
        success_fn: str = "",
        env_kwargs: Mapping[str, Any] | None = None,
        image: bool = False,
        camera: str | None = None,
        image_size: int = 96,
        render_mode: str | None = None,
        render_size: int = 256,
        cameras: Mapping[str, str] | None = None,
    ) -> None:
        try:
            self._image_keys = list(image_cameras(image, camera or RENDER_CAMERA, cameras, (RENDER_CAMERA,)))
        except ValueError as error:
            raise ExternalTaskError(
                f"task={source!r} has one camera, {RENDER_CAMERA!r} (its render() frames): {error}"
            ) from None
        if render_mode not in (None, "rgb_array"):
            raise ExternalTaskError(f"render_mode={render_mode!r}; expected None or 'rgb_array'")
        self.source = source
        self.image_size = image_size
        self.render_mode = render_mode
        self.render_size = render_size
        frames_needed = bool(self._image_keys) or render_mode == "rgb_array"
        self.inner = build_inner_env(source, "rgb_array" if frames_needed else None, env_kwargs or {})
        try:
            self._adapt(source, frames_needed, rename, success_fn, image_size)
        except Exception:
            self.inner.close()
            raise
        self._steps = 0
        self._warned_no_success = False

    def _adapt(
        self,
        source: str,
        frames_needed: bool,
        rename: Mapping[str, str] | None,
        success_fn: str,
        image_size: int,
    ) -> None:
        """Check the inner env against the contract and set up the adapted spaces."""
        inner_meta = self.inner.metadata or {}
        if frames_needed and "rgb_array" not in inner_meta.get("render_modes", []):
            raise ExternalTaskError(
                f"task={source!r} cannot render: its env lists render modes "
                f"{inner_meta.get('render_modes', [])}, not 'rgb_array'; train on its state "
                "observations and evaluate with eval.videos=0"
            )
        self._rename = dict(rename or {})
        self._success_fn: SuccessFn | None = load_object(success_fn, "success_fn") if success_fn else None
        self._spaces = _adapted_spaces(self.inner.observation_space, self._rename, source)
        spaces: dict[str, gym.spaces.Box] = dict(self._spaces)
        for key in self._image_keys:
            if key in spaces:
                raise ExternalTaskError(
                    f"task={source!r} already has an observation key {key!r}; rename it (rename=...) to "
                    f"record rendered frames as {key!r}"
                )
            spaces[key] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(dict[str, gym.Space[Any]](spaces))  # type: ignore[assignment]
        self.action_space, self._action_low, self._action_high = self._unit_action_space(source)
        self.metadata = {**self.metadata, "render_fps": self.fps}

    def _unit_action_space(self, source: str) -> tuple[gym.spaces.Box, np.ndarray, np.ndarray]:
        space = self.inner.action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ExternalTaskError(
                f"task={source!r}: action space {space} is not a 1-D Box; the policies output continuous "
                "action vectors"
            )
        low, high = space.low.astype(np.float64), space.high.astype(np.float64)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise ExternalTaskError(
                f"task={source!r}: action space {space} is unbounded; actions are mapped from [-1, 1] onto "
                "the env's bounds, so declare finite ones on its action_space (the range to drive it in)"
            )
        return gym.spaces.Box(-1.0, 1.0, space.shape, np.float32), low, high

    @property
    def fps(self) -> float:
        """Control steps per second: the env's metadata["render_fps"], else 1 / dt."""
        render_fps = (self.inner.metadata or {}).get("render_fps")
        if render_fps:
            return float(render_fps)
        dt = getattr(self.inner.unwrapped, "dt", None)
        return 1.0 / float(dt) if dt else DEFAULT_FPS

    @property
    def native_shapes(self) -> dict[str, tuple[int, ...]]:
        """The env's own observation keys (no rendered images) and their per-step shapes."""
        return {key: tuple(int(d) for d in space.shape) for key, space in self._spaces.items()}

    @property
    def action_dim(self) -> int:
        return int(self._action_low.shape[0])

    @property
    def can_render(self) -> bool:
        return "rgb_array" in (self.inner.metadata or {}).get("render_modes", [])

    def to_env_action(self, action: np.ndarray) -> np.ndarray:
        """An action in [-1, 1] -> the env's own units (linear onto its Box bounds)."""
        unit = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        env_action = self._action_low + (unit + 1.0) * 0.5 * (self._action_high - self._action_low)
        dtype: Any = self.inner.action_space.dtype
        result: np.ndarray = env_action.astype(dtype)
        return result

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        obs, info = self.inner.reset(seed=seed, options=options)
        self._steps = 0
        adapted = self._observation(obs)
        return adapted, {**info, "success": False, "steps": 0}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action has shape {action.shape}; expected {self.action_space.shape}")
        obs, reward, terminated, truncated, info = self.inner.step(self.to_env_action(action))
        self._steps += 1
        adapted = self._observation(obs)
        success = self._success(adapted, info)
        info = {**info, "success": success, "steps": self._steps}
        return adapted, float(reward), bool(terminated) or success, bool(truncated), info

    def _success(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> bool:
        if self._success_fn is not None:
            return bool(self._success_fn(obs, info))
        for key in ("success", "is_success"):
            if key in info:
                return bool(info[key])
        if not self._warned_no_success:
            self._warned_no_success = True
            log.warning(
                "task %s reports no info['success'] or info['is_success'] and has no success function: "
                "its episodes count as failures (mean return is still measured); register the task with "
                "success_fn=<module>:<function> (docs/tasks.md)",
                self.source,
            )
        return False

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return _resize(self._frame(), self.render_size)

    def close(self) -> None:
        self.inner.close()

    def _frame(self) -> np.ndarray:
        frame = self.inner.render()
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[-1] != 3:
            raise ExternalTaskError(
                f"task={self.source!r}: render() returned {type(frame).__name__}"
                f"{getattr(frame, 'shape', '')}; expected an RGB frame (H, W, 3) uint8"
            )
        return np.asarray(frame, dtype=np.uint8)

    def _observation(self, obs: Any) -> dict[str, np.ndarray]:
        if isinstance(self.inner.observation_space, gym.spaces.Box):
            items = [("state", obs)]
        else:
            items = [(self._rename.get(key, key), value) for key, value in obs.items()]
        adapted: dict[str, np.ndarray] = {}
        for name, value in items:
            array = np.asarray(value)
            adapted[name] = array if _image_like(self._spaces[name]) else array.reshape(-1).astype(np.float32)
        if self._image_keys:
            frame = _resize(self._frame(), self.image_size)
            adapted.update({key: frame for key in self._image_keys})
        return adapted


def external_task_spec(
    source: str,
    *,
    name: str | None = None,
    expert: str = "",
    success_fn: str = "",
    success: str = "",
    rename: Mapping[str, str] | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    max_episode_steps: int | None = None,
    tags: tuple[str, ...] = ("external",),
    **spec_fields: Any,
) -> TaskSpec:
    """A TaskSpec for a user's env (``source`` is ``gym:<id>`` or ``<module>:<factory>``), its spaces
    and rate read from one instance of the env. ``expert`` is a ``<module>:<factory>`` with
    ``factory(seed) -> expert(obs, info) -> action in [-1, 1]``; ``success_fn`` a ``<module>:<function>``
    with ``function(obs, info) -> bool``; further keywords are TaskSpec fields (history_steps, ...)."""
    kwargs = {
        "source": source,
        "rename": dict(rename or {}),
        "success_fn": success_fn,
        "env_kwargs": dict(env_kwargs or {}),
    }
    env = ExternalTaskEnv(**kwargs)  # type: ignore[arg-type]
    try:
        shapes = env.native_shapes
        action_dim = env.action_dim
        fps = env.fps
        cameras = (RENDER_CAMERA,) if env.can_render else ()
        limit = max_episode_steps or _episode_limit(env.inner, source)
    finally:
        env.close()
    return TaskSpec(
        name=name or source,
        entry_point="envs.external:ExternalTaskEnv",
        expert_entry_point=expert,
        state_dim=shapes["state"][0] if "state" in shapes else 0,
        action_dim=action_dim,
        fps=fps,
        max_episode_steps=limit,
        success=success
        or (f"success_fn {success_fn}" if success_fn else "info['success'] or info['is_success']"),
        cameras=cameras,
        tags=tags,
        observation_shapes=shapes,
        kwargs=kwargs,
        **spec_fields,
    )


def _episode_limit(env: gym.Env[Any, Any], source: str) -> int:
    spec = env.spec
    if spec is not None and spec.max_episode_steps:
        return int(spec.max_episode_steps)
    log.warning(
        "task %s declares no episode limit (its gymnasium spec has no max_episode_steps); using %d steps "
        "(set max_episode_steps= on scd-collect and eval.max_steps= to change it)",
        source,
        DEFAULT_EPISODE_STEPS,
    )
    return DEFAULT_EPISODE_STEPS
