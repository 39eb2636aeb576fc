"""The task registry: one entry per task, registered with gymnasium as ``scd/<name>``.

Each task module under ``envs/`` calls :func:`register_task` at import; :func:`get_task`,
:func:`make_env` and :func:`make_expert` import the built-in modules on first use so that
``import envs`` stays cheap (Meta-World is only imported when one of its tasks is built).

Tasks from outside (docs/tasks.md): ``get_task("gym:<id>")`` and ``get_task("<module>:<factory>")``
register an adapted env on demand (``envs.external``); modules that call ``register_task`` themselves
are imported by :func:`import_task_modules` (the CLIs' ``task_module=`` option) or through the
``scd_policy.tasks`` entry-point group of installed packages. The modules imported are remembered in
the ``SCD_POLICY_TASK_MODULES`` environment variable, so that the "spawn" worker processes of
collection and evaluation, which start from a fresh interpreter, register the same tasks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable, Iterable, Mapping
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
TASK_MODULES_ENV = "SCD_POLICY_TASK_MODULES"  # comma-separated modules every process imports
ENTRY_POINT_GROUP = "scd_policy.tasks"  # installed task packages: a module, or a function to call


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
    # Every observation key the env returns without ``image=True`` and its per-step shape; empty for
    # the built-in tasks, whose one such key is ``state`` (see ``observation_keys``).
    observation_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)  # fixed keywords for the entry point

    @property
    def observation_keys(self) -> dict[str, tuple[int, ...]]:
        """Observation key -> per-step shape, as the env returns them (images excluded unless the env
        returns them itself)."""
        return dict(self.observation_shapes) or {"state": (self.state_dim,)}

    @property
    def gym_id(self) -> str:
        # gymnasium reads "module:id" in an id as "import module first": no colon in ours.
        return f"scd/{self.name.replace(':', '.')}"


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
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            loaded = entry_point.load()
            if callable(loaded):
                loaded()
        import_task_modules(_modules_from_environment())


def _modules_from_environment() -> list[str]:
    return [name for name in os.environ.get(TASK_MODULES_ENV, "").split(",") if name]


def import_task_modules(modules: Iterable[str]) -> None:
    """Import modules that register tasks (``register_task``), here and in every process started from
    this one (they are added to ``SCD_POLICY_TASK_MODULES``). The working directory is importable."""
    from envs.external import ExternalTaskError, import_module

    remembered = _modules_from_environment()
    for module in modules:
        module = module.strip()
        if not module:
            continue
        try:
            import_module(module)  # the working directory is importable too
        except ModuleNotFoundError as error:
            raise ExternalTaskError(
                f"task_module={module!r}: cannot import it ({error}); put the module on PYTHONPATH or run "
                "the command from the folder that holds it"
            ) from None
        except Exception as error:
            raise ExternalTaskError(f"task_module={module!r} failed to import: {error!r}") from error
        if module not in remembered:
            remembered.append(module)
    if remembered:
        os.environ[TASK_MODULES_ENV] = ",".join(remembered)


def task_names(tag: str | None = None) -> list[str]:
    """Registered task names, optionally only those carrying ``tag``."""
    _load_builtins()
    return sorted(name for name, spec in _REGISTRY.items() if tag is None or tag in spec.tags)


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``; ``gym:<id>`` and ``<module>:<factory>`` are registered on first use."""
    _load_builtins()
    if name not in _REGISTRY:
        from envs.external import external_task_spec, is_external_source

        if not is_external_source(name):
            raise KeyError(
                f"unknown task {name!r}; registered tasks: {', '.join(task_names())}. A task from outside "
                "is gym:<gymnasium id>, <module>:<factory>, or a name registered by task_module=<module> "
                "(docs/tasks.md)"
            )
        register_task(external_task_spec(name))
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
    cameras: Mapping[str, str] | None = None,
) -> gym.Env[Any, Any]:
    """Build a task's env with dict observations (``state``; ``image`` when ``image=True``, from
    ``camera``; one more image key per entry of ``cameras``, observation key -> camera name);
    ``render()`` frames (``render_mode="rgb_array"``) are ``render_size`` pixels square."""
    spec = get_task(name)
    for wanted in [camera, *(cameras or {}).values()]:
        if wanted is not None and wanted not in spec.cameras:
            raise ValueError(f"task {name!r} has no camera {wanted!r}; available: {spec.cameras}")
    # Only asked of envs that are given some (a user's env need not take the keyword).
    extra: dict[str, Any] = {"cameras": dict(cameras)} if cameras else {}
    return gym.make(
        spec.gym_id,
        image=image,
        camera=camera or (spec.cameras[0] if spec.cameras else None),
        image_size=image_size,
        render_mode=render_mode,
        render_size=render_size,
        max_episode_steps=max_episode_steps or spec.max_episode_steps,
        **extra,
    )


def make_expert(name: str, seed: int = 0, entry_point: str | None = None) -> Expert:
    """The task's scripted expert (or the ``<module>:<factory>`` given as ``entry_point``), seeded:
    its random choices are reproducible."""
    from envs.external import ExternalTaskError, load_object

    path = entry_point or get_task(name).expert_entry_point
    if not path:
        raise ExternalTaskError(
            f"task {name!r} has no scripted expert; pass expert=<module>:<factory> with "
            "factory(seed) -> expert(obs, info) -> action in [-1, 1] (docs/tasks.md)"
        )
    factory = load_object(path, "expert")
    expert: Expert = factory(seed)
    if not callable(expert):
        raise ExternalTaskError(f"expert={path!r} returned {type(expert).__name__}, not a callable expert")
    return expert
