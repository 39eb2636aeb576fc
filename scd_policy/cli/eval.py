"""``scd-eval``: roll out a trained policy in its task's simulator (see ``scd-eval --help``)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from envs.registry import get_task
from scd_policy.cli.common import setup_logging, to_object, user_errors
from scd_policy.config import ConfigError, EvalConfig, config_dir
from scd_policy.evaluation import EnvSettings, evaluate
from scd_policy.io import atomic_write_text
from scd_policy.policies import load_policy
from scd_policy.training.checkpoint import resolve_policy_dir

log = logging.getLogger("scd_policy.eval")


@dataclass
class EvalRunConfig(EvalConfig):
    checkpoint: str = ""  # a run folder, a checkpoints/step_* folder, or a policy folder
    out: str = "results.json"  # results JSON; videos go to <out stem>_videos/
    task: str | None = None  # default: the task of the run the checkpoint came from
    camera: str | None = None  # default: the camera of that run
    device: str = "cpu"


def run_config_for(policy_dir: Path) -> dict[str, object]:
    """The resolved experiment config of the run a policy folder belongs to (empty if none)."""
    for parent in [policy_dir, *policy_dir.parents][:5]:
        if (parent / "config.yaml").exists():
            container = OmegaConf.to_container(OmegaConf.load(parent / "config.yaml"))
            return {str(k): v for k, v in container.items()} if isinstance(container, dict) else {}
    return {}


def run_eval(cfg: EvalRunConfig) -> dict[str, Any]:
    if not cfg.checkpoint:
        raise ConfigError("scd-eval needs checkpoint=<run folder or policy folder>")
    policy_dir = resolve_policy_dir(Path(cfg.checkpoint))
    run_cfg = run_config_for(policy_dir)
    task = cfg.task or str(run_cfg.get("task") or "")
    if not task:
        raise ConfigError(f"no task recorded for {policy_dir}; pass task=<name>")
    try:
        get_task(task)
    except KeyError as error:
        raise ConfigError(f"task={task!r}: {error.args[0]}") from None
    camera = cfg.camera or (str(run_cfg["camera"]) if run_cfg.get("camera") else None)
    policy = load_policy(policy_dir, device=cfg.device)
    log.info(
        "evaluating %s (%s) on %s: %d episodes x %d seeds",
        policy_dir,
        policy.config.type,
        task,
        cfg.episodes,
        len(cfg.seeds),
    )
    eval_cfg = EvalConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalConfig)})
    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(
            f"out={out} is a folder; scd-eval writes a results file, e.g. out={out / 'eval.json'}"
        )
    results = evaluate(
        policy,
        EnvSettings.for_policy(task, policy, camera),
        eval_cfg,
        results_path=out,
        video_dir=out.parent / f"{out.stem}_videos",
    )
    results["checkpoint"] = str(policy_dir)
    atomic_write_text(out, json.dumps(results, indent=2))
    log.info(
        "success %.1f%% (std over seeds %.1f), latency p50 %.2f ms / p90 %.2f ms per step (batch %d) -> %s",
        100 * results["success_rate"],
        100 * results["success_rate_std"],
        results["latency_ms_p50"],
        results["latency_ms_p90"],
        results["latency_batch"],
        out,
    )
    return results


@hydra.main(config_path=str(config_dir()), config_name="eval", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors("scd-eval"):
        run_eval(to_object(cfg, EvalRunConfig))


def main() -> None:
    ConfigStore.instance().store(name="eval_run_schema", node=EvalRunConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
