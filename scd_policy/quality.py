"""The quality table: success rates of the three policies trained on the same demonstrations with the
same budget, task by task (``scd-quality``).

For every cell (a task, observed through its state vector or through a camera) the sweep collects the
demonstrations once, trains each policy on them with the same overrides (size preset, steps, batch,
windows), evaluates the final EMA weights over ``episodes`` x ``seeds`` fixed evaluation seeds, and
rewrites the table after every finished run. Re-running the same command continues an interrupted
sweep: evaluated runs are read back, a training with a checkpoint resumes from it, and the datasets are
only topped up.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scd_policy.config import POLICY_TYPES, ConfigError, ExperimentConfig, resolve_config, task_spec
from scd_policy.io import atomic_write_text

if TYPE_CHECKING:  # imported where it runs: evaluation pulls in the simulators
    from scd_policy.evaluation import EvalRunConfig

log = logging.getLogger(__name__)

# The evaluation protocol's table: Meta-World tasks, our multimodal, memory and PushT-style tasks.
DEFAULT_TASKS = (
    "memory_cue",
    "reach_around",
    "push_t",
    "mw_push",
    "mw_pick_place",
    "mw_drawer_open",
    "mw_button_press_topdown",
)
DEFAULT_IMAGE_TASKS = ("push_t", "mw_drawer_open")


@dataclass
class QualityConfig:
    """What to train and evaluate. Every run of the sweep gets the same budget; see ``scd-quality --help``."""

    out: str = "quality"  # the sweep's folder: data/, runs/, quality.json, quality.md, quality.png
    # State-based cells: registered names, gym:<id> or <module>:<factory> (docs/tasks.md).
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    task_module: str | None = None  # a module that registers tasks (register_task), imported first
    image_tasks: list[str] = field(default_factory=lambda: list(DEFAULT_IMAGE_TASKS))  # camera cells
    # What an image-based policy reads: the camera alone by default (every task's state vector holds
    # the object poses, which would make the camera redundant).
    image_obs_keys: list[str] = field(default_factory=lambda: ["image"])
    image_size: int = 96
    policies: list[str] = field(default_factory=lambda: list(POLICY_TYPES))
    demos: int = 100  # expert demonstrations per cell (scripted experts, seeds 0, 1, ...)
    size: str = "small"  # size preset of every policy (on the command line: the `size` config group)
    # Policy fields on top of the preset, for every run (the CLI's `size` group fills them;
    # policy.decoder_layers=1 ...).
    policy: dict[str, Any] = field(default_factory=dict)
    steps: int = 20_000  # training steps of every run
    batch_size: int = 64
    threads: int | None = None  # torch CPU threads per training (None: torch's default)
    # Further config fields for every run, as dotted key=value (train.lr=1e-4, policy.horizon=8), applied
    # after the shared budget.
    overrides: list[str] = field(default_factory=list)
    # Per-task overrides of the same kind, after the shared ones and before `overrides`. A task that
    # declares the history it needs (TaskSpec.history_steps, memory_cue: 32) gets causal windows that
    # long without asking.
    task_overrides: dict[str, list[str]] = field(default_factory=dict)
    episodes: int = 50  # evaluation episodes per seed
    # Actions executed per chunk in evaluation, for every policy (None: each policy's own
    # n_action_steps). Each value has its own results file per run (eval.json for None,
    # eval_nexec<N>.json), so one trained sweep can be scored at several execution lengths.
    n_action_steps: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # evaluation seeds (fixed lists)
    # Training seeds: each (cell, policy) is trained once per seed (train.seed) and every run is scored
    # on all evaluation seeds; the table pools them.
    train_seeds: list[int] = field(default_factory=lambda: [0])
    n_envs: int = 2  # parallel environments during evaluation
    workers: int = 2  # collection worker processes
    # Few-step decoding (scd only): after each scd run, distil its decoder into a shortcut decoder
    # (policy.diffusion.shortcut) on the run's frozen encoder for `distill_steps` steps of the same
    # batch, and score it at each K listed here (e.g. [1, 2, 4]): extra rows next to the K = 10 one.
    few_step: list[int] = field(default_factory=list)
    distill_steps: int = 2000
    # Train and evaluate nothing: rewrite the table from the runs already evaluated under `out` (e.g. a
    # sweep split over several machines by task, its runs/ folders copied together).
    report_only: bool = False
    # (cell, policy) pairs trained at once, one process each (on an n-core CPU: jobs=n with threads=1).
    # The demonstrations are collected first; each pair's output goes to <out>/logs/<cell>_<policy>.txt
    # and the table is rewritten as pairs finish.
    jobs: int = 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.policies) - set(POLICY_TYPES))
        if unknown or not self.policies:
            raise ConfigError(f"policies={self.policies}: expected a non-empty subset of {POLICY_TYPES}")
        if not self.tasks and not self.image_tasks:
            raise ConfigError("tasks and image_tasks are both empty: nothing to run")
        if self.n_action_steps is not None and self.n_action_steps < 1:
            raise ConfigError(f"n_action_steps must be >= 1 or null, got {self.n_action_steps}")
        for name in ("demos", "steps", "batch_size", "episodes", "n_envs", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one evaluation seed")
        if not self.train_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise ConfigError(f"train_seeds={self.train_seeds}: expected distinct training seeds")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or null, got {self.threads}")
        if any(k < 1 for k in self.few_step) or len(set(self.few_step)) != len(self.few_step):
            raise ConfigError(f"few_step={self.few_step}: expected distinct denoising step counts >= 1")
        if self.few_step and "scd" not in self.policies:
            raise ConfigError(
                f"few_step={self.few_step} distils scd's decoder; policies={self.policies} has no scd"
            )
        if self.jobs < 1:
            raise ConfigError(f"jobs must be >= 1, got {self.jobs}")
        if self.distill_steps < 1:
            raise ConfigError(f"distill_steps must be >= 1, got {self.distill_steps}")
        for task in dict.fromkeys([*self.tasks, *self.image_tasks]):
            task_spec(task, self.task_module)  # an unknown task fails here, naming the registered ones


@dataclass(frozen=True)
class Cell:
    """One row of the table: a task and how the policies observe it."""

    task: str
    image: bool

    @property
    def name(self) -> str:
        return f"{self.task}_image" if self.image else self.task

    @property
    def observation(self) -> str:
        return "image" if self.image else "state"


def cells(cfg: QualityConfig) -> list[Cell]:
    return [Cell(task, False) for task in cfg.tasks] + [Cell(task, True) for task in cfg.image_tasks]


def eval_file(cfg: QualityConfig, num_inference_steps: int | None = None) -> str:
    """A run's results file for the sweep's execution length (and a distilled decoder's K)."""
    stem = "eval" if num_inference_steps is None else f"eval_k{num_inference_steps}"
    return f"{stem}.json" if cfg.n_action_steps is None else f"{stem}_nexec{cfg.n_action_steps}.json"


SHORTCUT_RUN = "shortcut"  # the distilled few-step decoder's run, inside the scd run it starts from


def few_step_eval_path(cfg: QualityConfig, cell: Cell, seed: int, num_inference_steps: int) -> Path:
    """The results file of an scd run's distilled decoder scored at K = ``num_inference_steps``."""
    return run_dir_of(cfg, cell, "scd", seed) / SHORTCUT_RUN / eval_file(cfg, num_inference_steps)


def is_few_step(row: dict[str, Any]) -> bool:
    """A quality.json row of a distilled few-step decoder (the markdown lists them in a table of their
    own; the main table and the plot leave them out)."""
    return bool(row.get("decoder") == "shortcut")


def run_dir_of(cfg: QualityConfig, cell: Cell, policy: str, seed: int) -> Path:
    return Path(cfg.out) / "runs" / cell.name / policy / f"seed{seed}"


def train_config(
    cfg: QualityConfig, cell: Cell, policy: str, seed: int, dataset: Path, run_dir: Path
) -> ExperimentConfig:
    """The training config of one run: ``scd-train``'s composition for the policy type and size preset,
    the sweep's shared budget set field by field, then the task's and the user's overrides on top (the
    last one wins)."""
    from scd_policy.training.experiment import compose_experiment, with_task_history

    base = compose_experiment([f"policy={policy}", f"size={cfg.size}"])
    every = max(1, min(1000, cfg.steps // 4))
    experiment = replace(
        base,
        dataset=str(dataset),
        out=str(run_dir),
        # Left out of the training config: the sweep scores the final weights once instead of paying
        # for rollouts during training.
        task="",
        data=replace(
            base.data, path=str(dataset), obs_keys=list(cfg.image_obs_keys) if cell.image else ["state"]
        ),
        policy=replace(base.policy, **_follow_train_window(dict(cfg.policy))),
        train=replace(
            base.train,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            seed=seed,
            checkpoint_every=every,
            val_every=every,
            num_threads=cfg.threads if cfg.threads is not None else base.train.num_threads,
            # Always resume: a run with a checkpoint continues from it, one without starts at step 0.
            resume=True,
        ),
    )
    experiment = with_task_history(experiment, cell.task)
    extra = [*cfg.task_overrides.get(cell.task, []), *cfg.overrides]
    if any(item.startswith("policy.train_window=") for item in extra) and not any(
        item.startswith("policy.context_window=") for item in extra
    ):
        extra.append("policy.context_window=0")  # see _follow_train_window
    if not extra:
        return experiment
    try:
        merged = OmegaConf.merge(OmegaConf.structured(experiment), OmegaConf.from_dotlist(extra))
    except OmegaConfBaseException as error:
        raise ConfigError(f"overrides {extra}: {error}") from None
    assert isinstance(merged, DictConfig)  # merged onto a structured dataclass config
    return resolve_config(merged, ExperimentConfig)


def _follow_train_window(changes: dict[str, Any]) -> dict[str, Any]:
    # The composed config has context_window resolved (0 -> train_window); a new train_window without
    # a context_window of its own must be followed by it again, as it would in scd-train.
    if "train_window" in changes:
        changes.setdefault("context_window", 0)
    return changes


def collect_dataset(cfg: QualityConfig, cell: Cell) -> Path:
    """The cell's demonstrations (``<out>/data/<cell>.zarr``), collected or topped up to ``demos``."""
    from scd_policy.collection import CollectConfig, collect_up_to

    dataset = Path(cfg.out) / "data" / f"{cell.name}.zarr"
    collect_up_to(
        CollectConfig(
            task=cell.task,
            out=str(dataset),
            image=cell.image,
            image_size=cfg.image_size,
            workers=cfg.workers,
            task_module=cfg.task_module,
        ),
        cfg.demos,
    )
    return dataset


def run_cell(cfg: QualityConfig, cell: Cell, policy: str, seed: int) -> dict[str, Any]:
    """Train (or resume) one policy on one cell's demonstrations with one training seed and evaluate it;
    reuses a finished run."""
    from scd_policy.evaluation import run_evaluation
    from scd_policy.training.checkpoint import list_checkpoints
    from scd_policy.training.experiment import run_training

    run_dir = run_dir_of(cfg, cell, policy, seed)
    results_path = run_dir / eval_file(cfg)
    if results_path.exists():
        log.info("%s / %s / seed %d: already evaluated (%s)", cell.name, policy, seed, results_path)
        results: dict[str, Any] = json.loads(results_path.read_text())
        return results
    dataset = collect_dataset(cfg, cell)
    log.info(
        "%s / %s / seed %d: training (%s preset, %d steps) -> %s",
        cell.name,
        policy,
        seed,
        cfg.size,
        cfg.steps,
        run_dir,
    )
    done = max((step for step, _ in list_checkpoints(run_dir)), default=0) >= cfg.steps
    started = time.perf_counter()
    policy_dir = run_training(train_config(cfg, cell, policy, seed, dataset, run_dir))
    if not done:  # training wall time, summed over the invocations that finished (a killed one's is lost)
        clock = run_dir / TRAIN_TIME_FILE
        earlier = float(json.loads(clock.read_text())["seconds"]) if clock.exists() else 0.0
        atomic_write_text(clock, json.dumps({"seconds": earlier + time.perf_counter() - started}) + "\n")
    log.info(
        "%s / %s / seed %d: evaluating %d episodes x seeds %s",
        cell.name,
        policy,
        seed,
        cfg.episodes,
        cfg.seeds,
    )
    return run_evaluation(_eval_config(cfg, cell, policy_dir, results_path))


def _eval_config(
    cfg: QualityConfig, cell: Cell, policy_dir: Path, out: Path, num_inference_steps: int | None = None
) -> EvalRunConfig:
    """The sweep's evaluation protocol for one policy folder, scored into ``out``."""
    from scd_policy.evaluation import EvalRunConfig

    return EvalRunConfig(
        checkpoint=str(policy_dir),
        task=cell.task,
        task_module=cfg.task_module,
        episodes=cfg.episodes,
        seeds=list(cfg.seeds),
        n_envs=cfg.n_envs,
        videos=0,
        out=str(out),
        n_action_steps=cfg.n_action_steps,
        num_inference_steps=num_inference_steps,
    )


def distill_config(cfg: QualityConfig, cell: Cell, seed: int, dataset: Path) -> ExperimentConfig:
    """The few-step run of one scd run: the same composition and data, its weights as the start, the
    encoder and tokenizer frozen, a shortcut decoder trained for ``distill_steps``."""
    teacher = run_dir_of(cfg, cell, "scd", seed)
    config = train_config(cfg, cell, "scd", seed, dataset, teacher / SHORTCUT_RUN)
    every = max(1, min(1000, cfg.distill_steps // 4))
    return replace(
        config,
        policy=replace(config.policy, diffusion=replace(config.policy.diffusion, shortcut=True)),
        train=replace(
            config.train,
            steps=cfg.distill_steps,
            checkpoint_every=every,
            val_every=every,
            warmup_steps=min(config.train.warmup_steps, cfg.distill_steps // 10),
            init_from=str(teacher),
            freeze=["encoder.", "tokenizer."],
        ),
    )


def run_few_step(cfg: QualityConfig, cell: Cell, seed: int) -> dict[int, dict[str, Any]]:
    """Distil (or resume distilling) the decoder of a finished scd run and score it at every K of
    ``few_step``; reuses what is done. Returns K -> evaluation results."""
    from scd_policy.evaluation import run_evaluation
    from scd_policy.training.experiment import run_training

    run_dir = run_dir_of(cfg, cell, "scd", seed) / SHORTCUT_RUN
    results: dict[int, dict[str, Any]] = {}
    todo = [k for k in cfg.few_step if not few_step_eval_path(cfg, cell, seed, k).exists()]
    policy_dir: Path | None = None
    if todo:
        log.info(
            "%s / scd / seed %d: distilling a few-step decoder (%d steps, encoder frozen) -> %s",
            cell.name,
            seed,
            cfg.distill_steps,
            run_dir,
        )
        started = time.perf_counter()
        policy_dir = run_training(
            distill_config(cfg, cell, seed, Path(cfg.out) / "data" / f"{cell.name}.zarr")
        )
        clock = run_dir / TRAIN_TIME_FILE
        if not clock.exists():
            atomic_write_text(clock, json.dumps({"seconds": time.perf_counter() - started}) + "\n")
    for k in cfg.few_step:
        path = few_step_eval_path(cfg, cell, seed, k)
        if not path.exists():
            assert policy_dir is not None
            log.info("%s / scd shortcut / seed %d: evaluating at K = %d", cell.name, seed, k)
            run_evaluation(_eval_config(cfg, cell, policy_dir, path, num_inference_steps=k))
        results[k] = json.loads(path.read_text())
    return results


TRAIN_TIME_FILE = "train_time.json"


def train_minutes(cfg: QualityConfig, cell: Cell, policy: str, inner: str = "") -> float | None:
    """Mean training wall minutes of a (cell, policy)'s runs, or of the runs ``inner`` of them (the
    distilled decoders); None where a run did not record it."""
    times = []
    for seed in cfg.train_seeds:
        clock = run_dir_of(cfg, cell, policy, seed) / inner / TRAIN_TIME_FILE
        if not clock.exists():
            return None
        times.append(float(json.loads(clock.read_text())["seconds"]) / 60.0)
    return float(np.mean(times))


def table_row(
    cfg: QualityConfig, cell: Cell, policy: str, runs: list[dict[str, Any]], shortcut: bool = False
) -> dict[str, Any]:
    """One (cell, policy) entry of quality.json from its runs' evaluation results (one per training
    seed): success pooled over every (training seed, evaluation seed) pair, std over those pairs, with
    the budget every run had. ``shortcut``: the runs are scd's distilled few-step decoders."""
    per_seed = [[s["success_rate"] for s in r["per_seed"]] for r in runs]
    pooled = np.array([rate for rates in per_seed for rate in rates])
    row: dict[str, Any] = {
        "task": cell.task,
        "observation": cell.observation,
        "policy": policy,
        "success_rate": float(pooled.mean()),
        "success_rate_std": float(pooled.std()),
        "per_seed_success": per_seed,  # [training seed][evaluation seed]
        "episodes_per_seed": runs[0]["episodes_per_seed"],
        "seeds": runs[0]["seeds"],
        "mean_return": float(np.mean([r["mean_return"] for r in runs])),
        "checkpoints": [r.get("checkpoint") for r in runs],
        # The budget and protocol, in the row layout.
        "obs": cell.observation,
        "demos": cfg.demos,
        "train_seeds": list(cfg.train_seeds),
        "episodes": runs[0]["episodes_per_seed"] * len(runs[0]["seeds"]),
        "success_mean": float(pooled.mean()),
        "success_std": float(pooled.std()),
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "size": cfg.size,
        "train_minutes": train_minutes(cfg, cell, policy),
        "n_action_steps": cfg.n_action_steps,  # None: each policy's own
        "num_inference_steps": runs[0].get("num_inference_steps"),  # K
        "decoder": "shortcut" if shortcut else "flow",
        # What this cell's runs changed on top of the composition (levers, windows): rows that differ
        # here are different variants, never pooled together.
        "overrides": [*cfg.task_overrides.get(cell.task, []), *cfg.overrides],
    }
    if shortcut:
        row["distill_steps"] = cfg.distill_steps
        row["distill_minutes"] = train_minutes(cfg, cell, policy, SHORTCUT_RUN)
    for key in runs[0]:
        if key.startswith(("max_", "final_")) and not key.endswith("_std"):  # e.g. push_t's coverage
            row[key] = float(np.mean([r[key] for r in runs]))
    if "max_coverage" in row:
        row["best_coverage_mean"] = row["max_coverage"]
    if "success_modes" in runs[0]:  # a multimodal task: how the successes split over its modes
        modes = sorted({mode for r in runs for mode in r["success_modes"]})
        row["success_modes"] = {
            m: float(np.mean([r["success_modes"].get(m, 0.0) for r in runs])) for m in modes
        }
    return row


# What makes two table rows the same experiment: rows that agree on all of these differ only in their
# training seeds and may be pooled (``pool_rows``).
POOL_KEYS = (
    "task",
    "obs",
    "policy",
    "demos",
    "steps",
    "batch_size",
    "size",
    "n_action_steps",
    "num_inference_steps",
    "decoder",
    "overrides",
)


def pool_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one experiment trained with different seeds (a sweep split over machines or sessions by
    ``train_seeds``) merged into one row each, as ``table_row`` would have written it for all the seeds
    at once: success pooled over every (training seed, evaluation seed) pair, the other means weighted
    by training seeds. First-seen order; rows of different experiments (``POOL_KEYS``) stay apart."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        key = json.dumps([row.get(name) for name in POOL_KEYS], sort_keys=True)
        groups.setdefault(key, []).append(row)
    return [_pool(group) for group in groups.values()]


def _pool(group: list[dict[str, Any]]) -> dict[str, Any]:
    if len(group) == 1:
        return group[0]
    seeds = [seed for row in group for seed in row["train_seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"{group[0]['task']} / {group[0]['policy']}: the rows to pool repeat training seeds {seeds}; "
            "each training seed may appear in one row only"
        )
    weights = np.array([len(row["train_seeds"]) for row in group], dtype=np.float64)

    def mean(name: str) -> float:
        return float(np.average([row[name] for row in group], weights=weights))

    per_seed = [rates for row in group for rates in row["per_seed_success"]]
    pooled = np.array([rate for rates in per_seed for rate in rates])
    out = dict(group[0])
    out.update(
        success_rate=float(pooled.mean()),
        success_rate_std=float(pooled.std()),
        success_mean=float(pooled.mean()),
        success_std=float(pooled.std()),
        per_seed_success=per_seed,
        train_seeds=seeds,
        checkpoints=[path for row in group for path in row["checkpoints"]],
        mean_return=mean("mean_return"),
    )
    for name in group[0]:
        if name.startswith(("max_", "final_", "best_")) and all(name in row for row in group):
            out[name] = mean(name)
    # Training time: the mean over the runs that recorded it (None only where none did).
    known = [
        (row["train_minutes"], w)
        for row, w in zip(group, weights, strict=True)
        if row.get("train_minutes") is not None
    ]
    out["train_minutes"] = (
        float(np.average([m for m, _ in known], weights=[w for _, w in known])) if known else None
    )
    if all("success_modes" in row for row in group):
        modes = sorted({mode for row in group for mode in row["success_modes"]})
        out["success_modes"] = {
            m: float(np.average([row["success_modes"].get(m, 0.0) for row in group], weights=weights))
            for m in modes
        }
    return out


def _percent(row: dict[str, Any]) -> str:
    text = f"{100 * row['success_rate']:.1f}% ± {100 * row['success_rate_std']:.1f}"
    if "max_coverage" in row:
        text += f" (coverage {row['max_coverage']:.2f})"
    if row.get("success_modes"):  # a multimodal task: the successes' split over its modes
        text += (
            " (modes " + " / ".join(f"{100 * v:.0f}%" for _, v in sorted(row["success_modes"].items())) + ")"
        )
    return text


def markdown(rows: list[dict[str, Any]], cfg: QualityConfig, command: str) -> str:
    """The table: one line per cell, a column per policy, and SCD's margin over the better baseline."""
    policies = [p for p in POLICY_TYPES if p in cfg.policies]
    lines = [
        f"Success rate, mean ± std over training seeds {cfg.train_seeds} x evaluation seeds {cfg.seeds} "
        f"({cfg.episodes} episodes each); "
        f"{cfg.demos} demonstrations per task, `{cfg.size}` preset, {cfg.steps} steps of batch "
        f"{cfg.batch_size} for every policy. PushT: mean best coverage per episode in brackets."
        + (
            f" Evaluated with n_action_steps={cfg.n_action_steps} for every policy."
            if cfg.n_action_steps
            else ""
        ),
        "",
        f"Command: `{command}`",
        "",
        "| task | observation | " + " | ".join(policies) + " | scd - best baseline (points) |",
        "|---|---|" + "---|" * len(policies) + "---|",
    ]
    main = [r for r in rows if not is_few_step(r)]
    for cell in cells(cfg):
        found = {
            r["policy"]: r for r in main if r["task"] == cell.task and r["observation"] == cell.observation
        }
        entries = [_percent(found[p]) if p in found else "—" for p in policies]
        baselines = [found[p]["success_rate"] for p in policies if p != "scd" and p in found]
        margin = "—"
        if "scd" in found and baselines:
            margin = f"{100 * (found['scd']['success_rate'] - max(baselines)):+.1f}"
        lines.append(f"| {cell.task} | {cell.observation} | " + " | ".join(entries) + f" | {margin} |")
    lines += _category_means(main, cfg, policies)
    few = [r for r in rows if is_few_step(r)]
    if few:
        # The K the scd runs were scored at (their config's num_inference_steps), as the first column.
        base_k = next((r["num_inference_steps"] for r in main if r["policy"] == "scd"), "?")
        lines += [
            "",
            f"Few-step decoding: scd's decoder distilled into a shortcut decoder on its frozen encoder "
            f"({cfg.distill_steps} steps of batch {cfg.batch_size}), scored at K denoising steps, next to "
            "the run it started from.",
            "",
            f"| task | observation | scd K = {base_k} | "
            + " | ".join(f"K = {k}" for k in cfg.few_step)
            + " |",
            "|---|---|---|" + "---|" * len(cfg.few_step),
        ]
        for cell in cells(cfg):
            here = [r for r in rows if r["task"] == cell.task and r["observation"] == cell.observation]
            base = [r for r in here if r["policy"] == "scd" and not is_few_step(r)]
            by_k = {r["num_inference_steps"]: r for r in here if is_few_step(r)}
            if not by_k:
                continue
            entries = [_percent(base[0]) if base else "—"]
            entries += [_percent(by_k[k]) if k in by_k else "—" for k in cfg.few_step]
            lines.append(f"| {cell.task} | {cell.observation} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


# Published per-category means of Meta-World with 10 demonstrations: Diffusion Policy as reported in
# the DP3 paper (Ze et al. 2024) — images, the mean of the top-5 evaluations, other seeds.
DP3_PAPER_DIFFUSION_POLICY = {"easy": 83.6, "medium": 31.1, "hard": 9.0, "very_hard": 26.6}


def task_category(task: str, task_module: str | None = None) -> str | None:
    """A Meta-World task's difficulty category (its ``metaworld_<category>`` tag), else None."""
    tags = task_spec(task, task_module).tags
    return next((tag.removeprefix("metaworld_") for tag in tags if tag.startswith("metaworld_")), None)


def _category_means(rows: list[dict[str, Any]], cfg: QualityConfig, policies: list[str]) -> list[str]:
    """Per-category means of the state-based Meta-World cells, next to the published anchor."""
    by_category: dict[str, list[str]] = {}
    for task in cfg.tasks:
        level = task_category(task, cfg.task_module)
        if level is not None:
            by_category.setdefault(level, []).append(task)
    if not by_category:
        return []
    lines = [
        "",
        "Meta-World by category (mean over its tasks; state observations): next to Diffusion Policy's "
        "published means with 10 demonstrations (DP3 paper) — a different protocol: images, the mean of "
        "its top-5 evaluations.",
        "",
        "| category | tasks | " + " | ".join(policies) + " | Diffusion Policy, DP3 paper |",
        "|---|---|" + "---|" * len(policies) + "---|",
    ]
    for level in ("easy", "medium", "hard", "very_hard"):
        tasks = by_category.get(level)
        if not tasks:
            continue
        entries = []
        for policy in policies:
            found = [
                r["success_rate"]
                for r in rows
                if r["policy"] == policy and r["task"] in tasks and r["observation"] == "state"
            ]
            entries.append(f"{100 * np.mean(found):.1f}%" if len(found) == len(tasks) else "—")
        lines.append(
            f"| {level.replace('_', ' ')} | {', '.join(tasks)} | "
            + " | ".join(entries)
            + f" | {DP3_PAPER_DIFFUSION_POLICY[level]:.1f}% |"
        )
    return lines


def plot(rows: list[dict[str, Any]], cfg: QualityConfig, path: Path) -> Path:
    """Grouped bars: success per cell and policy, seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [p for p in POLICY_TYPES if p in cfg.policies]
    names = [c.name for c in cells(cfg)]
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names)) + 1.5, 4))
    for index, policy in enumerate(policies):
        xs, ys, errs = [], [], []
        for x, cell in enumerate(cells(cfg)):
            for r in rows:
                if is_few_step(r):  # the few-step rows are in the markdown table only
                    continue
                if r["policy"] == policy and r["task"] == cell.task and r["observation"] == cell.observation:
                    xs.append(x + (index - (len(policies) - 1) / 2) * width)
                    ys.append(100 * r["success_rate"])
                    errs.append(100 * r["success_rate_std"])
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=policy)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(ylabel="success rate (%)", ylim=(0, 105), title="Same demonstrations, same training budget")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_table(rows: list[dict[str, Any]], cfg: QualityConfig, command: str) -> dict[str, Path]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quality" if cfg.n_action_steps is None else f"quality_nexec{cfg.n_action_steps}"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "plot": out / f"{stem}.png"}
    atomic_write_text(paths["json"], json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    atomic_write_text(paths["markdown"], markdown(rows, cfg, command))
    plot(rows, cfg, paths["plot"])
    return paths


def evaluated_rows(cfg: QualityConfig) -> list[dict[str, Any]]:
    """The table rows of every (cell, policy) whose runs are all evaluated already (``report_only``)."""
    rows: list[dict[str, Any]] = []
    for cell in cells(cfg):
        for policy in cfg.policies:
            paths = [run_dir_of(cfg, cell, policy, seed) / eval_file(cfg) for seed in cfg.train_seeds]
            missing = [str(path) for path in paths if not path.exists()]
            if missing:
                log.info("%s / %s: left out of the table, not evaluated yet: %s", cell.name, policy, missing)
                continue
            rows.append(table_row(cfg, cell, policy, [json.loads(path.read_text()) for path in paths]))
            for k in cfg.few_step if policy == "scd" else []:
                few = [few_step_eval_path(cfg, cell, seed, k) for seed in cfg.train_seeds]
                if all(path.exists() for path in few):
                    runs = [json.loads(path.read_text()) for path in few]
                    rows.append(table_row(cfg, cell, policy, runs, shortcut=True))
    if not rows:
        raise ConfigError(
            f"report_only=true: no evaluated runs under {Path(cfg.out) / 'runs'} for these tasks, "
            f"policies and train_seeds {cfg.train_seeds}; run the sweep without report_only first"
        )
    return rows


def run_pair(cfg: QualityConfig, cell: Cell, policy: str) -> list[dict[str, Any]]:
    """The table rows of one (cell, policy): its runs at every training seed, pooled, and for scd the
    distilled few-step rows."""
    runs = [run_cell(cfg, cell, policy, seed) for seed in cfg.train_seeds]
    rows = [table_row(cfg, cell, policy, runs)]
    if policy == "scd" and cfg.few_step:
        distilled = [run_few_step(cfg, cell, seed) for seed in cfg.train_seeds]
        rows += [table_row(cfg, cell, policy, [d[k] for d in distilled], shortcut=True) for k in cfg.few_step]
    return rows


def run_quality(cfg: QualityConfig, command: str = "scd-quality") -> list[dict[str, Any]]:
    """Run every (cell, policy) of the sweep (``jobs`` at a time), rewriting the table after each;
    returns its rows in table order. With ``report_only`` nothing is run: the table is written from the
    runs evaluated already."""
    if cfg.report_only:
        rows = evaluated_rows(cfg)
        paths = write_table(rows, cfg, command)
        log.info("table of %d evaluated (cell, policy) pairs -> %s", len(rows), paths["markdown"])
        return rows
    pairs = [(cell, policy) for cell in cells(cfg) for policy in cfg.policies]
    finished: dict[int, list[dict[str, Any]]] = {}  # pair index -> its rows

    def record(index: int, rows: list[dict[str, Any]]) -> None:
        finished[index] = rows
        paths = write_table([row for i in sorted(finished) for row in finished[i]], cfg, command)
        cell, policy = pairs[index]
        log.info(
            "%s / %s: success %.1f%% ± %.1f -> %s",
            cell.name,
            policy,
            100 * rows[0]["success_rate"],
            100 * rows[0]["success_rate_std"],
            paths["markdown"],
        )

    if cfg.jobs == 1 or len(pairs) == 1:
        for index, (cell, policy) in enumerate(pairs):
            record(index, run_pair(cfg, cell, policy))
    else:
        _run_pairs_in_processes(cfg, pairs, record)
    return [row for i in sorted(finished) for row in finished[i]]


def _run_pairs_in_processes(
    cfg: QualityConfig, pairs: list[tuple[Cell, str]], record: Callable[[int, list[dict[str, Any]]], None]
) -> None:
    """``run_pair`` of every pair in ``cfg.jobs`` worker processes, the next pair starting as one
    finishes; ``record`` is called in this process as each one's rows arrive."""
    for cell in cells(cfg):  # once, before several workers of one cell would collect it at once
        collect_dataset(cfg, cell)
    logs = Path(cfg.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Spawned, not forked: a fork of a process that has run torch (collection, a caller's own work) can
    # inherit locked OpenMP state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=context) as pool:
        futures = {
            pool.submit(_run_pair_logged, cfg, cell, policy, logs / f"{cell.name}_{policy}.txt"): index
            for index, (cell, policy) in enumerate(pairs)
        }
        log.info("%d (cell, policy) pairs, %d at a time; their logs: %s/", len(pairs), cfg.jobs, logs)
        try:
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BaseException:
            for future in futures:  # no new pairs; the running ones finish (their runs checkpoint)
                future.cancel()
            raise


def _run_pair_logged(cfg: QualityConfig, cell: Cell, policy: str, log_path: Path) -> list[dict[str, Any]]:
    """A worker process's ``run_pair``, its output (logs, progress bars, native libraries') appended to
    ``log_path``."""
    from scd_policy.cli.common import setup_logging  # the one log format

    with log_path.open("a") as sink:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            os.dup2(sink.fileno(), stream.fileno())
    setup_logging()
    log.info("%s / %s: started in process %d", cell.name, policy, os.getpid())
    return run_pair(cfg, cell, policy)
