"""The README's main job as a library function: collect demonstrations -> train an SCD policy -> roll
it out in MuJoCo, with a small embedded configuration sized for a 2-core CPU (behind ``scd-demo``).

Each stage is the library's own entry point (``collect_up_to``, ``run_training``, ``run_evaluation``);
the training config is the one ``scd-train`` composes for the size preset, changed field by field.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("scd_policy.demo")

DEFAULT_TASK = "memory_cue"


@dataclass(frozen=True)
class MainJob:
    task: str = DEFAULT_TASK
    episodes: int = 100  # demonstrations (kept between runs: a second run reuses them)
    steps: int = 1500  # training steps
    size: str = "tiny"
    eval_episodes: int = 50
    workdir: Path = Path()
    # Chunks denoised per training window (policy.decoder_steps): with memory_cue's 32-step windows the
    # denoiser dominates a training step; 8 of 32 keeps every step in the encoder pass.
    decoder_steps: int = 8

    @property
    def dataset(self) -> Path:
        return self.workdir / "datasets" / f"{self.task}.zarr"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "runs" / f"demo_{self.task}_scd"


@dataclass
class MainJobResult:
    results: dict[str, Any]  # scd-eval's results
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage


def run_main_job(job: MainJob) -> MainJobResult:
    from scd_policy.collection import CollectConfig, collect_up_to
    from scd_policy.evaluation import EvalRunConfig, run_evaluation
    from scd_policy.training.experiment import compose_experiment, run_training, with_task_history

    started = time.perf_counter()
    log.info("[1/3] demonstrations")
    collect_up_to(CollectConfig(task=job.task, out=str(job.dataset), workers=2), job.episodes)
    collected = time.perf_counter()

    log.info("[2/3] training SCD (%s preset, %d steps) -> %s", job.size, job.steps, job.run_dir)
    base = compose_experiment([f"dataset={job.dataset}", f"out={job.run_dir}", f"size={job.size}"])
    every = max(1, job.steps // 4)
    cfg = replace(
        base,
        train=replace(
            base.train,
            steps=job.steps,
            batch_size=32,
            warmup_steps=100,
            log_every=50,
            val_every=every,
            checkpoint_every=every,
            num_threads=1,
        ),
    )
    # The history window the task declares (memory_cue: 32 steps, from cue to decision).
    cfg = with_task_history(cfg, job.task)
    cfg = replace(
        cfg, policy=replace(cfg.policy, decoder_steps=min(job.decoder_steps, cfg.policy.train_window))
    )
    # A fresh run folder each time, so the printed figures belong to this run.
    if job.run_dir.exists():
        shutil.rmtree(job.run_dir)
    policy_dir = run_training(cfg)
    trained = time.perf_counter()

    log.info("[3/3] evaluating over %d episodes in MuJoCo", job.eval_episodes)
    results = run_evaluation(
        EvalRunConfig(
            checkpoint=str(policy_dir),
            task=job.task,
            episodes=job.eval_episodes,
            seeds=[0],
            n_envs=1,
            videos=2,
            out=str(job.run_dir / "eval.json"),
        )
    )
    done = time.perf_counter()
    seconds = {"collect": collected - started, "train": trained - collected, "eval": done - trained}
    seconds["total"] = done - started
    return MainJobResult(results=results, seconds=seconds)
