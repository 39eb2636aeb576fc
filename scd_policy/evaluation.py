"""Rollout evaluation: run a policy through the deployment runtime in parallel MuJoCo environments.

Episodes are seeded from a fixed list: for evaluation seed ``s`` and episode ``i`` the environment is
reset with ``EVAL_SEED_BASE + s * 1_000_003 + i`` and the policy's sampling noise is seeded with ``s``,
so two runs of the same checkpoint give the same numbers. Success rate is reported per seed and as
mean and standard deviation over seeds (the spread the anchors report).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from envs.registry import get_task, make_env
from scd_policy.backends import attach_backend
from scd_policy.config import ConfigError, EvalConfig, task_spec
from scd_policy.conventions import is_policy_image
from scd_policy.io import atomic_write_text
from scd_policy.policies import Policy, load_policy
from scd_policy.runtime import PolicyRuntime
from scd_policy.training.checkpoint import resolve_policy_dir

log = logging.getLogger(__name__)

EPISODE_SEED_STRIDE = 1_000_003  # keeps the episode seeds of different evaluation seeds disjoint
# Demonstrations are collected from seed 0 upwards (scd-collect); evaluation episodes start far above,
# so a policy is never scored on the initial states it was trained on.
EVAL_SEED_BASE = 1_000_000_000


@dataclass(frozen=True)
class EnvSettings:
    """How to build the task's environment so that it produces what the policy reads."""

    task: str
    image: bool = False  # observe ``image`` from ``camera`` (None: the task's first camera)
    camera: str | None = None
    image_size: int = 96
    cameras: tuple[tuple[str, str], ...] = ()  # further image keys: (observation key, camera name)

    @classmethod
    def for_policy(
        cls, task: str, policy: Policy, camera: str | None = None, cameras: Mapping[str, str] | None = None
    ) -> EnvSettings:
        return cls.for_inputs(task, policy.config.input_shapes, camera, cameras)

    @classmethod
    def for_inputs(
        cls,
        task: str,
        shapes: Mapping[str, Sequence[int]],
        camera: str | None = None,
        cameras: Mapping[str, str] | None = None,
    ) -> EnvSettings:
        """The env settings that render every image key of ``shapes`` (policy shapes, CHW), whatever
        its name: ``image`` from ``camera``; any other key from ``cameras[key]``, else the camera the
        key is named after (``image_side`` or ``side`` -> the task's camera ``side``)."""
        images = {key: [int(d) for d in shape] for key, shape in shapes.items() if is_policy_image(shape)}
        if not images:
            return cls(task=task)
        sizes = {(shape[1], shape[2]) for shape in images.values()}
        if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
            raise ConfigError(
                f"the policy reads images of sizes {sorted(sizes)} (H, W); rollouts render one square size "
                "for every camera"
            )
        spec = task_spec(task)
        # Image keys the env observes itself (a Dict env's own camera) need no rendering.
        rendered = [key for key in sorted(images) if key != "image" and key not in spec.observation_keys]
        extra = {key: camera_for_key(key, task, spec.cameras, cameras or {}) for key in rendered}
        return cls(
            task=task,
            image="image" in images,
            camera=camera,
            image_size=next(iter(sizes))[0],
            cameras=tuple(extra.items()),
        )

    def env_fn(self, render_size: int | None) -> Callable[[], gym.Env[Any, Any]]:
        def build() -> gym.Env[Any, Any]:
            env = make_env(
                self.task,
                image=self.image,
                camera=self.camera,
                image_size=self.image_size,
                render_mode="rgb_array" if render_size else None,
                render_size=render_size or 256,
                cameras=dict(self.cameras),
            )
            return env

        return build


def camera_for_key(key: str, task: str, available: Sequence[str], cameras: Mapping[str, str]) -> str:
    """The camera that renders the policy's image key ``key`` on ``task``."""
    if key in cameras:
        return cameras[key]
    for name in (key.removeprefix("image_"), key):
        if name in available:
            return name
    raise ConfigError(
        f"the policy reads image key {key!r}, but task {task!r} has no camera named after it (cameras: "
        f"{list(available)}); say which camera renders it with cameras={{{key}: <camera>}}"
    )


def _stack_obs(obs: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
    return {key: obs[key] for key in keys}


class Runtime(Protocol):
    """What a rollout drives: ``PolicyRuntime`` here, or a fleet of server sessions
    (``scd_policy.serve.ClientFleet``)."""

    latencies_ms: deque[float]
    num_inference_steps: int

    def reset(self, mask: Any = None, seed: int | None = None) -> None: ...

    def step(self, obs: Mapping[str, Any]) -> np.ndarray: ...


def evaluate(
    policy: Policy,
    settings: EnvSettings,
    cfg: EvalConfig,
    results_path: Path | None = None,
    video_dir: Path | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Roll out ``cfg.episodes`` episodes per seed through a local ``PolicyRuntime``; returns the
    metrics (also written to results_path). See ``evaluate_runtime``."""

    def open_runtime(n_envs: int, seed: int) -> Runtime:
        return PolicyRuntime(
            policy,
            num_envs=n_envs,
            n_action_steps=cfg.n_action_steps,
            num_inference_steps=cfg.num_inference_steps,
            seed=seed,
            replan_every_step=cfg.replan_every_step,
            latency_ticks=cfg.latency_ticks,
            seam=cfg.seam,
            context_window=cfg.context_window,
        )

    return evaluate_runtime(
        open_runtime,
        list(policy.config.input_shapes),
        policy.config.type,
        settings,
        cfg,
        results_path=results_path,
        video_dir=video_dir,
        progress=progress,
        extra=extra,
    )


def evaluate_runtime(
    open_runtime: Callable[[int, int], Runtime],
    obs_keys: list[str],
    policy_type: str,
    settings: EnvSettings,
    cfg: EvalConfig,
    results_path: Path | None = None,
    video_dir: Path | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Roll out ``cfg.episodes`` episodes per seed, the policy stepped by ``open_runtime(n_envs,
    seed)``, a runtime whose stream i draws noise from ``stream_generator(seed, i)``.

    The first ``cfg.videos`` episodes of the first seed are recorded as mp4 files in ``video_dir``.
    """
    spec = get_task(settings.task)
    max_steps = cfg.max_steps or spec.max_episode_steps
    n_envs = min(cfg.n_envs, cfg.episodes)
    record = cfg.videos > 0 and video_dir is not None
    if record and not spec.cameras:
        log.warning(
            "no videos: task %s cannot render (its env has no rgb_array render mode); eval.videos=0 "
            "silences this",
            settings.task,
        )
        record = False
    env_fns = [settings.env_fn(cfg.video_size if (record and i == 0) else None) for i in range(n_envs)]
    envs: gym.vector.AsyncVectorEnv | gym.vector.SyncVectorEnv
    if n_envs > 1:
        # "spawn", not fork: a forked child inherits this process's EGL/OpenGL state (from any earlier
        # rendering here) and its first render can hang.
        envs = gym.vector.AsyncVectorEnv(
            env_fns, autoreset_mode=gym.vector.AutoresetMode.DISABLED, context="spawn"
        )
    else:
        envs = gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    per_seed: list[dict[str, Any]] = []
    latencies: list[float] = []
    num_steps = 0  # K, as the runtime resolves it
    recorded: dict[str, list[np.ndarray]] = {}  # video file name -> frames, written after the results
    try:
        bar = tqdm(total=cfg.episodes * len(cfg.seeds), desc=f"eval {settings.task}", disable=not progress)
        for seed in cfg.seeds:
            runtime = open_runtime(n_envs, seed)
            outcome = _run_seed(
                envs,
                runtime,
                seed,
                cfg.episodes,
                max_steps,
                obs_keys,
                bar,
                record,
                cfg.videos,
                spec.episode_metrics,
                spec.mode_metric,
            )
            latencies.extend(runtime.latencies_ms)
            num_steps = runtime.num_inference_steps
            for episode, frames in outcome.pop("frames").items():
                recorded[f"seed{seed}_episode{episode}.mp4"] = frames
            record = False  # videos of the first seed only
            per_seed.append({"seed": seed, **outcome})
        bar.close()
    finally:
        envs.close()

    rates = np.array([s["success_rate"] for s in per_seed])
    lat = np.array(latencies) if latencies else np.array([np.nan])
    results: dict[str, Any] = {
        "task": settings.task,
        "policy": policy_type,
        "episodes_per_seed": cfg.episodes,
        "seeds": list(cfg.seeds),
        "success_rate": float(rates.mean()),
        "success_rate_std": float(rates.std()),
        "mean_return": float(np.mean([s["mean_return"] for s in per_seed])),
        "mean_episode_length": float(np.mean([s["mean_episode_length"] for s in per_seed])),
        "action_jerk": float(np.mean([s["action_jerk"] for s in per_seed])),
        **(
            {"success_modes": _mode_split([m for s in per_seed for m in s.pop("success_mode_list")])}
            if spec.mode_metric
            else {}
        ),
        "max_action_jump": float(np.mean([s["max_action_jump"] for s in per_seed])),
        **_metric_summary(per_seed, spec.episode_metrics),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p90": float(np.percentile(lat, 90)),
        "latency_batch": n_envs,
        "num_inference_steps": num_steps,
        "execution": {
            "replan_every_step": cfg.replan_every_step,
            "latency_ticks": cfg.latency_ticks,
            "seam": cfg.seam,
            "context_window": cfg.context_window,  # None: the policy's own
        },
        "per_seed": per_seed,
        "videos": [],
        **(extra or {}),
    }
    # The numbers first: a video that cannot be written (codec, disk) must not cost the evaluation.
    if results_path is not None:
        atomic_write_text(results_path, json.dumps(results, indent=2))
    if recorded and video_dir is not None:
        try:
            results["videos"] = [
                _write_video(video_dir / name, frames, spec.fps) for name, frames in recorded.items()
            ]
        except (OSError, RuntimeError, ValueError) as error:
            log.warning(
                "videos not written to %s (%s); the results are complete without them", video_dir, error
            )
        else:
            if results_path is not None:
                atomic_write_text(results_path, json.dumps(results, indent=2))
    return results


def _run_seed(
    envs: gym.vector.AsyncVectorEnv | gym.vector.SyncVectorEnv,
    runtime: Runtime,
    seed: int,
    episodes: int,
    max_steps: int,
    obs_keys: list[str],
    bar: tqdm[Any],
    record: bool,
    n_videos: int,
    metrics: tuple[str, ...] = (),
    mode_metric: str = "",
) -> dict[str, Any]:
    n_envs = envs.num_envs
    # Per running episode: the best and the latest value of each of the task's episode metrics.
    best = np.full((n_envs, len(metrics)), -np.inf)
    latest = np.zeros((n_envs, len(metrics)))
    episode_best: list[np.ndarray] = []
    episode_final: list[np.ndarray] = []
    next_episode = 0
    episode_of = np.full(n_envs, -1)  # which episode each env runs (-1: idle)
    returns = np.zeros(n_envs)
    lengths = np.zeros(n_envs, dtype=np.int64)
    successes: list[bool] = []
    episode_returns: list[float] = []
    episode_lengths: list[int] = []
    frames: dict[int, list[np.ndarray]] = {}
    executed: list[list[np.ndarray]] = [[] for _ in range(n_envs)]  # this episode's actions, per env
    success_modes: list[int] = []  # mode_metric's final value of every successful episode
    episode_jerk: list[float] = []
    episode_jump: list[float] = []

    def start(mask: np.ndarray) -> dict[str, np.ndarray]:
        nonlocal next_episode
        seeds: list[int | None] = [None] * n_envs
        for env_id in np.flatnonzero(mask):
            if next_episode < episodes:
                episode_of[env_id] = next_episode
                seeds[env_id] = EVAL_SEED_BASE + seed * EPISODE_SEED_STRIDE + next_episode
                next_episode += 1
            else:
                episode_of[env_id] = -1
        returns[mask] = 0.0
        lengths[mask] = 0
        for env_id in np.flatnonzero(mask):
            executed[env_id] = []
        best[mask] = -np.inf
        latest[mask] = 0.0
        obs, _ = envs.reset(seed=seeds, options={"reset_mask": mask})
        runtime.reset(mask)
        return obs  # type: ignore[no-any-return]

    obs = start(np.ones(n_envs, dtype=bool))
    while (episode_of >= 0).any():
        if record and episode_of[0] >= 0 and episode_of[0] < n_videos:
            frame = envs.call("render")[0]
            frames.setdefault(int(episode_of[0]), []).append(frame)
        actions = runtime.step(_stack_obs(obs, obs_keys))
        obs, reward, terminated, truncated, info = envs.step(actions)
        for env, action in zip(executed, np.asarray(actions, dtype=np.float64), strict=True):
            env.append(action)
        returns += reward
        lengths += 1
        for index, key in enumerate(metrics):
            if key not in info:
                raise KeyError(
                    f"episode metric {key!r} (TaskSpec.episode_metrics) is missing from the step info"
                )
            latest[:, index] = np.asarray(info[key], dtype=np.float64)
        best = np.maximum(best, latest)
        # Idle envs (no episode left to give them) keep stepping until all are done; they are reset
        # when they finish too, since some tasks (Meta-World) refuse steps past their limit.
        finished = terminated | truncated | (lengths >= max_steps)
        if finished.any():
            success = np.asarray(info.get("success", np.zeros(n_envs, dtype=bool)), dtype=bool)
            for env_id in np.flatnonzero(finished & (episode_of >= 0)):
                successes.append(bool(success[env_id]))
                if mode_metric and success[env_id]:
                    success_modes.append(int(np.asarray(info[mode_metric])[env_id]))
                episode_returns.append(float(returns[env_id]))
                episode_lengths.append(int(lengths[env_id]))
                episode_best.append(best[env_id].copy())
                episode_final.append(latest[env_id].copy())
                jerk, jump = action_smoothness(np.stack(executed[env_id]))
                episode_jerk.append(jerk)
                episode_jump.append(jump)
                bar.update(1)
            if successes:
                bar.set_postfix(success=f"{np.mean(successes):.2f}")
            obs = start(finished)
    return {
        "success_rate": float(np.mean(successes)),
        "mean_return": float(np.mean(episode_returns)),
        "mean_episode_length": float(np.mean(episode_lengths)),
        "action_jerk": _mean_of_finite(episode_jerk),
        "max_action_jump": float(np.mean(episode_jump)),
        **(
            {"success_modes": _mode_split(success_modes), "success_mode_list": success_modes}
            if mode_metric
            else {}
        ),
        **{f"max_{key}": float(np.mean([v[i] for v in episode_best])) for i, key in enumerate(metrics)},
        **{f"final_{key}": float(np.mean([v[i] for v in episode_final])) for i, key in enumerate(metrics)},
        "frames": frames,
    }


def _mode_split(modes: list[int]) -> dict[str, float]:
    """Fraction of the successes per mode value (keys as strings, for JSON)."""
    values, counts = np.unique(np.asarray(modes, dtype=np.int64), return_counts=True)
    return {str(int(v)): float(c) / max(len(modes), 1) for v, c in zip(values, counts, strict=True)}


def _mean_of_finite(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def action_smoothness(actions: np.ndarray) -> tuple[float, float]:
    """How smooth an episode's executed actions (T, Da) are: the mean norm of their third difference
    (the jerk of a commanded position; NaN under 4 steps) and the largest tick-to-tick jump (the
    "violent jumps at chunk seams" users report), in action units."""
    jump = float(np.linalg.norm(np.diff(actions, axis=0), axis=1).max()) if len(actions) > 1 else 0.0
    if len(actions) < 4:
        return float("nan"), jump
    return float(np.linalg.norm(np.diff(actions, n=3, axis=0), axis=1).mean()), jump


def _metric_summary(per_seed: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, float]:
    """Mean and spread over seeds of each episode metric's per-seed mean (best and final value)."""
    summary: dict[str, float] = {}
    for key in metrics:
        for kind in ("max", "final"):
            values = np.array([s[f"{kind}_{key}"] for s in per_seed])
            summary[f"{kind}_{key}"] = float(values.mean())
            summary[f"{kind}_{key}_std"] = float(values.std())
    return summary


def _write_video(path: Path, frames: list[np.ndarray], fps: float) -> str:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    with imageio.get_writer(tmp, fps=max(1, round(fps)), codec="libx264", macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)  # type: ignore[attr-defined]
    tmp.replace(path)
    return str(path)


# ---- a whole evaluation run (scd-eval) ------------------------------------------------------
@dataclass
class EvalRunConfig(EvalConfig):
    checkpoint: str = ""  # a run folder, a checkpoints/step_* folder, or a policy folder
    out: str = "results.json"  # results JSON; videos go to <out stem>_videos/
    task: str | None = None  # default: the task of the run the checkpoint came from
    task_module: str | None = None  # default: that run's task_module (a module registering the task)
    camera: str | None = None  # default: the camera of that run
    # Image keys other than `image` -> the camera rendering each (default: that run's, else by name).
    cameras: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    # What runs the network: torch, onnx (exported graphs on ONNX Runtime, kept in <policy>/onnx; the
    # onnx extra) or compile (torch.compile); the last two for scd (scd_policy.backends).
    backend: str = "torch"
    # CPU threads of torch (and ONNX Runtime) in this process; null: torch's default. With other jobs on
    # the cores, 1 avoids oversubscription (2 threads on 2 busy cores can be 10x slower per step).
    threads: int | None = None
    # Roll out through an scd-serve server instead (ws://host:port; checkpoint not needed), one session
    # per parallel environment; token: its shared secret.
    server: str | None = None
    token: str | None = None


def run_config_for(policy_dir: Path) -> dict[str, object]:
    """The resolved experiment config of the run a policy folder belongs to (empty if none)."""
    for parent in [policy_dir, *policy_dir.parents][:5]:
        if (parent / "config.yaml").exists():
            container = OmegaConf.to_container(OmegaConf.load(parent / "config.yaml"))
            return {str(k): v for k, v in container.items()} if isinstance(container, dict) else {}
    return {}


def run_evaluation(cfg: EvalRunConfig) -> dict[str, Any]:
    """``scd-eval``'s work: resolve the policy (a folder here, or an ``scd-serve`` server), its task and
    camera, roll out, write the results."""
    if cfg.server:
        return _run_server_evaluation(cfg)
    if not cfg.checkpoint:
        raise ConfigError(
            "scd-eval needs checkpoint=<run folder or policy folder> (or server=ws://host:port)"
        )
    policy_dir = resolve_policy_dir(Path(cfg.checkpoint))
    run_cfg = run_config_for(policy_dir)
    task = cfg.task or str(run_cfg.get("task") or "")
    if not task:
        raise ConfigError(f"no task recorded for {policy_dir}; pass task=<name>")
    task_spec(task, cfg.task_module or _optional_str(run_cfg.get("task_module")))
    camera = cfg.camera or (str(run_cfg["camera"]) if run_cfg.get("camera") else None)
    recorded = run_cfg.get("cameras")
    cameras = {**(recorded if isinstance(recorded, dict) else {}), **cfg.cameras}
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ConfigError(f"threads must be >= 1 or null, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    policy = attach_backend(load_policy(policy_dir, device=cfg.device), cfg.backend, checkpoint=policy_dir)
    log.info(
        "evaluating %s (%s, backend %s) on %s: %d episodes x %d seeds",
        policy_dir,
        policy.config.type,
        cfg.backend,
        task,
        cfg.episodes,
        len(cfg.seeds),
    )
    out = _results_path(cfg)
    results = evaluate(
        policy,
        EnvSettings.for_policy(task, policy, camera, cameras),
        _eval_config(cfg),
        results_path=out,
        video_dir=out.parent / f"{out.stem}_videos",
        extra={"checkpoint": str(policy_dir), "backend": cfg.backend},
    )
    _log_results(results, out)
    return results


def _optional_str(value: object) -> str | None:
    return str(value) if value else None


def _eval_config(cfg: EvalRunConfig) -> EvalConfig:
    return EvalConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalConfig)})


def _results_path(cfg: EvalRunConfig) -> Path:
    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(
            f"out={out} is a folder; scd-eval writes a results file, e.g. out={out / 'eval.json'}"
        )
    return out


def _run_server_evaluation(cfg: EvalRunConfig) -> dict[str, Any]:
    """Roll out through ``n_envs`` sessions of an ``scd-serve`` server (its own K and chunk settings)."""
    from scd_policy.serve.client import ClientFleet

    assert cfg.server is not None

    if (
        cfg.num_inference_steps is not None
        or cfg.n_action_steps is not None
        or cfg.latency_ticks
        or cfg.context_window is not None
    ):
        raise ConfigError(
            "with server=... the server decides num_inference_steps, n_action_steps, latency_ticks and "
            "the context window; set them on scd-serve instead"
        )
    n_envs = min(cfg.n_envs, cfg.episodes)
    with ClientFleet(cfg.server, n_envs, token=cfg.token) as fleet:
        meta = fleet.metadata
        task = cfg.task or str(meta.get("task") or "")
        if not task:
            raise ConfigError(
                f"the server at {cfg.server} does not say which task its policy is for; pass task=<name>"
            )
        task_spec(task, cfg.task_module or _optional_str(meta.get("task_module")))
        shapes = {key: list(value["shape"]) for key, value in meta["observations"].items()}
        camera = cfg.camera or meta.get("camera")
        log.info(
            "evaluating the %s policy served at %s on %s: %d episodes x %d seeds",
            meta["policy_type"],
            cfg.server,
            task,
            cfg.episodes,
            len(cfg.seeds),
        )

        def open_runtime(n: int, seed: int) -> Runtime:
            fleet.reset(seed=seed)
            return fleet

        out = _results_path(cfg)
        results = evaluate_runtime(
            open_runtime,
            list(shapes),
            str(meta["policy_type"]),
            EnvSettings.for_inputs(task, shapes, camera, {**meta.get("cameras", {}), **cfg.cameras}),
            _eval_config(cfg),
            results_path=out,
            video_dir=out.parent / f"{out.stem}_videos",
            extra={"server": cfg.server},
        )
    _log_results(results, out)
    return results


def _log_results(results: dict[str, Any], out: Path) -> None:
    log.info(
        "success %.1f%% (std over seeds %.1f), latency p50 %.2f ms / p90 %.2f ms per step (batch %d) -> %s",
        100 * results["success_rate"],
        100 * results["success_rate_std"],
        results["latency_ms_p50"],
        results["latency_ms_p90"],
        results["latency_batch"],
        out,
    )
