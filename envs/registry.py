"""The task registry: one entry per task, registered with gymnasium as ``scd/<name>``.

Each task module under ``envs/`` calls :func:`register_task` at import; :func:`get_task`,
:func:`make_env` and :func:`make_expert` import the built-in modules on first use so that
``import envs`` stays cheap (Meta-World is only imported when one of its tasks is built).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

# expert(obs, info) -> action in [-1, 1]; a new episode is signalled by info["steps"] == 0.
Expert = Callable[[dict[str, np.ndarray], dict[str, Any]], np.ndarray]

_BUILTIN_MODULES = (
    "envs.tasks.reach_around",
    "envs.tasks.memory_cue",
    "envs.tasks.push_t",
    "envs.metaworld_tasks",
)


@dataclass(frozen=True)
class TaskSpec:
    """What a user (and the training/eval code) needs to know about a task."""

    name: str  # short name used on the command line, e.g. "push_t"
    entry_point: str  # "module:EnvClass" or "module:factory" accepting the make_env keywords
    expert_entry_point: str  # "module:factory" with factory(seed: int) -> Expert
    state_dim: int
    action_dim: int
    fps: float  # control steps per second
    max_episode_steps: int
    success: str  # the success criterion, in words
    cameras: tuple[str, ...]  # cameras usable for image observations; the first is the default
    tags: tuple[str, ...] = ()  # e.g. "own", "metaworld", "multimodal", "memory"
    # Numeric ``info`` entries reported every step that evaluation summarises per episode (best and final
    # value), e.g. push_t's goal "coverage" (PushT results are quoted as coverage, not only success).
    episode_metrics: tuple[str, ...] = ()
    # Steps of history a policy should see to succeed (causal policies: train_window/context_window;
    # diffusion_policy: n_obs_steps); 0 when the last couple of observations suffice. scd-train warns
    # when a policy sees less.
    history_steps: int = 0
    # Actions a policy should execute per chunk before replanning (0: the policy's own default). A task
    # whose state must be reacted to at every tick says so (reach_around: 1; docs/RESULTS.md, issue H).
    n_action_steps: int = 0
    # A multimodal task's ``info`` entry naming the mode an episode took (reach_around: "passed_side",
    # -1 left / +1 right); evaluation reports how the successes split over its final values.
    mode_metric: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)  # fixed keywords for the entry point

    @property
    def gym_id(self) -> str:
        return f"scd/{self.name}"


_REGISTRY: dict[str, TaskSpec] = {}
_builtins_loaded = False


def register_task(spec: TaskSpec) -> None:
    """Add a task to the registry and to gymnasium's (id ``scd/<name>``)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"task {spec.name!r} is already registered with a different spec")
    _REGISTRY[spec.name] = spec
    if spec.gym_id not in gym.registry:
        gym.register(
            id=spec.gym_id,
            entry_point=spec.entry_point,
            max_episode_steps=spec.max_episode_steps,
            kwargs=dict(spec.kwargs),
        )


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _builtins_loaded = True


def task_names(tag: str | None = None) -> list[str]:
    """Registered task names, optionally only those carrying ``tag``."""
    _load_builtins()
    return sorted(name for name, spec in _REGISTRY.items() if tag is None or tag in spec.tags)


def get_task(name: str) -> TaskSpec:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(task_names())}")
    return _REGISTRY[name]


def make_env(
    name: str,
    *,
    image: bool = False,
    camera: str | None = None,
    image_size: int = 96,
    render_mode: str | None = None,
    render_size: int = 256,
    max_episode_steps: int | None = None,
) -> gym.Env[Any, Any]:
    """Build a task's env with dict observations (``state``; ``image`` when ``image=True``);
    ``render()`` frames (``render_mode="rgb_array"``) are ``render_size`` pixels square."""
    spec = get_task(name)
    if camera is not None and camera not in spec.cameras:
        raise ValueError(f"task {name!r} has no camera {camera!r}; available: {spec.cameras}")
    return gym.make(
        spec.gym_id,
        image=image,
        camera=camera or spec.cameras[0],
        image_size=image_size,
        render_mode=render_mode,
        render_size=render_size,
        max_episode_steps=max_episode_steps or spec.max_episode_steps,
    )


def make_expert(name: str, seed: int = 0) -> Expert:
    """The task's scripted expert, seeded (its random choices are reproducible)."""
    module_name, _, attr = get_task(name).expert_entry_point.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    expert: Expert = factory(seed)
    return expert
