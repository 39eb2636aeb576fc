"""``scd-train``: train a policy on a replay buffer (see ``scd-train --help``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from scd_policy.cli.common import plain_message, setup_logging, to_object
from scd_policy.config import ExperimentConfig, config_dir, register_configs
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
        settings = EnvSettings.for_policy(cfg.task, policy, cfg.camera)
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
    return to_object(cfg, ExperimentConfig)


def history_overrides(task: str) -> list[str]:
    """The scd-train overrides that give the causal policies the history window ``task`` declares
    (``TaskSpec.history_steps``); none for a task whose last observations suffice."""
    from envs.registry import get_task

    steps = get_task(task).history_steps
    return [f"policy.train_window={steps}", f"policy.context_window={steps}"] if steps else []


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


def run_training(cfg: ExperimentConfig) -> Path:
    """Train as configured; fills the camera from the dataset card when the policy reads images."""
    card: dict[str, Any] | None = None
    if cfg.camera is None and any(key != "state" for key in cfg.data.obs_keys):
        try:
            card = ReplayBuffer.open(cfg.data.path).meta
        except DatasetError as error:
            raise SystemExit(str(error)) from None
        camera = card.get("camera")
        cfg.camera = str(camera) if camera else None
    task = cfg.task  # the task of the rollouts, else the one the dataset was collected on
    if not task:
        try:
            card = card if card is not None else ReplayBuffer.open(cfg.data.path).meta
            task = str(card.get("task") or "")
        except DatasetError:
            pass  # the trainer reports a bad dataset with its own message
    warn_if_history_too_short(cfg, task)
    run_dir = Path(cfg.out)
    return train(cfg, run_dir, rollout_during_training(cfg, run_dir))


@hydra.main(config_path=str(config_dir()), config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    setup_logging()
    experiment = to_object(cfg, ExperimentConfig)
    try:
        final = run_training(experiment)
    except DatasetError as error:
        raise SystemExit(f"dataset error: {plain_message(error)}") from None
    log.info("done: %s", final)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
