"""One training run from a resolved :class:`ExperimentConfig` (behind ``scd-train``, ``scd-demo`` and
``scd-quality``): compose the config, check everything that can be checked before the first step,
then hand over to the trainer, with rollouts during training when a task is set."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from scd_policy.config import (
    ExperimentConfig,
    config_dir,
    register_configs,
    resolve_config,
    task_spec,
)
from scd_policy.conventions import is_image_shape, policy_shape
from scd_policy.data.replay_buffer import DatasetError, ReplayBuffer
from scd_policy.policies import Policy
from scd_policy.training.trainer import RolloutFn, train

log = logging.getLogger("scd_policy.train")


def rollout_during_training(cfg: ExperimentConfig, run_dir: Path) -> RolloutFn | None:
    """Periodic success-rate evaluation on the first evaluation seed (the full sweep is scd-eval's)."""
    if not cfg.task:
        return None
    from dataclasses import replace

    from scd_policy.evaluation import EnvSettings, evaluate

    eval_cfg = replace(cfg.eval, seeds=cfg.eval.seeds[:1], videos=0)

    def run(policy: Policy, step: int) -> dict[str, float]:
        settings = EnvSettings.for_policy(cfg.task, policy, cfg.camera, cfg.cameras)
        results_path = run_dir / "eval" / f"step_{step:08d}.json"
        results = evaluate(policy, settings, eval_cfg, results_path=results_path, progress=False)
        return {key: float(results[key]) for key in ("success_rate", "mean_return", "latency_ms_p50")}

    return run


def compose_experiment(overrides: list[str]) -> ExperimentConfig:
    """The ExperimentConfig ``scd-train <overrides>`` would run (for scripts, tests and the demo)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    # Called from inside another Hydra app (scd-quality) the global Hydra instance is taken: compose in
    # a clean one, then hand the outer one back.
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = compose("train", overrides=overrides)
    finally:
        if outer is not None:
            global_hydra.clear()
            global_hydra.initialize(outer)
    return resolve_config(cfg, ExperimentConfig)


def with_task_history(cfg: ExperimentConfig, task: str) -> ExperimentConfig:
    """``cfg`` with what ``task`` declares its policies need: causal windows as long as
    ``TaskSpec.history_steps`` and ``TaskSpec.n_action_steps`` actions per chunk."""
    from dataclasses import replace

    from envs.registry import get_task

    spec = get_task(task)
    policy = cfg.policy
    if spec.history_steps:
        policy = replace(policy, train_window=spec.history_steps, context_window=spec.history_steps)
    if spec.n_action_steps:
        policy = replace(policy, n_action_steps=spec.n_action_steps)
    return cfg if policy is cfg.policy else replace(cfg, policy=policy)


def warn_if_history_too_short(cfg: ExperimentConfig, task: str | None) -> bool:
    """Log a warning (and return True) when the task needs more history than the policy will see."""
    if not task:
        return False
    from envs.registry import get_task

    try:
        needed = get_task(task).history_steps
    except KeyError:  # a dataset from elsewhere: nothing known about its task
        return False
    policy = cfg.policy
    seen, fields = (
        (policy.context_window, "policy.train_window and policy.context_window")
        if policy.is_causal
        else (policy.n_obs_steps, "policy.n_obs_steps")
    )
    if seen >= needed:
        return False
    log.warning(
        "task %s needs ~%d steps of history (TaskSpec.history_steps) but this %s policy sees %d: it will "
        "not be able to remember what the task asks for. Set %s to %d.",
        task,
        needed,
        policy.type,
        seen,
        fields,
        needed,
    )
    return True


def check_dataset_against_task(cfg: ExperimentConfig, buffer: ReplayBuffer) -> None:
    """Before the first step: the task exists, and every key the policy reads from the dataset is one
    the task's env observes, with the same size (and the actions fit its action space); images need a
    task that renders. The message names both sides and the way out."""
    if not cfg.task:
        return
    spec = task_spec(cfg.task, cfg.task_module)
    observed = {key: policy_shape(shape) for key, shape in spec.observation_keys.items()}
    fix = (
        f"this dataset was not recorded on {cfg.task}: pass the task it was recorded on, set data.obs_keys "
        "to keys both have, or task=null to train without rollouts"
    )
    have = buffer.shapes.get(cfg.data.action_key)
    if have is not None and tuple(have) != (spec.action_dim,):
        raise DatasetError(
            f"data/{cfg.data.action_key} in {buffer.path} has per-step shape {list(have)} but "
            f"task={cfg.task}'s action space is {[spec.action_dim]}; {fix}"
        )
    for key in cfg.data.obs_keys:
        have = buffer.shapes.get(key)
        if have is None:  # make_datasets names the missing key
            continue
        if is_image_shape(have):
            if not spec.cameras:
                raise DatasetError(
                    f"data/{key} in {buffer.path} holds images, but task={cfg.task}'s env cannot render "
                    f"(no cameras); {fix}"
                )
            continue
        if key not in observed:
            raise DatasetError(
                f"data/{key} in {buffer.path} is an observation the policy would read, but task={cfg.task}'s "
                f"env observes only {sorted(observed)} (plus rendered images); {fix}"
            )
        if policy_shape(have) != observed[key]:
            raise DatasetError(
                f"data/{key} in {buffer.path} has per-step shape {list(have)} but task={cfg.task}'s {key!r} "
                f"observation is {list(spec.observation_keys[key])}; {fix}"
            )


def run_training(cfg: ExperimentConfig) -> Path:
    """Train as configured, after checking everything that can be checked before the first step.

    The camera of image observations comes from the dataset card when not given (the experiment config
    is copied, not changed in place).
    """
    from dataclasses import replace

    buffer = ReplayBuffer.open(cfg.data.path) if cfg.data.path else None
    card: dict[str, Any] = buffer.meta if buffer is not None else {}
    collect_card: dict[str, Any] = card["card"] if isinstance(card.get("card"), dict) else {}
    recorded_module = collect_card.get("task_module")
    if cfg.task and cfg.task_module is None and recorded_module:
        # The dataset was collected on a task a module registers: rollouts need that module too.
        cfg = replace(cfg, task_module=str(recorded_module))
    if cfg.task:
        task_spec(cfg.task, cfg.task_module)  # an unknown task fails now, not after training
    recorded_camera = collect_card.get("camera") or card.get("camera")
    if cfg.camera is None and any(key != "state" for key in cfg.data.obs_keys) and recorded_camera:
        cfg = replace(cfg, camera=str(recorded_camera))
    recorded_cameras = collect_card.get("cameras") or card.get("cameras")
    if isinstance(recorded_cameras, dict) and recorded_cameras:
        cfg = replace(cfg, cameras={**{str(k): str(v) for k, v in recorded_cameras.items()}, **cfg.cameras})
    if buffer is not None:
        check_dataset_against_task(cfg, buffer)
    if not cfg.task:
        log.info("no task= given: training without rollouts (scd-eval needs task=<name> later)")
    # The task of the rollouts, else the one the dataset was collected on.
    warn_if_history_too_short(cfg, cfg.task or str(card.get("task") or ""))
    run_dir = Path(cfg.out)
    return train(cfg, run_dir, rollout_during_training(cfg, run_dir))
