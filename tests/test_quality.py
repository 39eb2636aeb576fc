"""``scd-quality`` end to end on real MuJoCo tasks: collect -> train -> evaluate per cell and policy, the
table on disk, an interrupted sweep continued without retraining, and the PushT coverage metric."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import scd_policy.training.experiment
from scd_policy.config import ConfigError
from scd_policy.policies import load_policy
from scd_policy.quality import (
    Cell,
    QualityConfig,
    markdown,
    pool_rows,
    run_dir_of,
    run_quality,
    table_row,
    train_config,
)

TINY = [
    "policy.train_window=4",
    "policy.context_window=8",
    "policy.horizon=8",
    "policy.n_action_steps=4",
    "train.warmup_steps=2",
    "train.log_every=5",
]


def tiny_sweep(out: Path) -> QualityConfig:
    return QualityConfig(
        out=str(out),
        tasks=["push_t"],
        image_tasks=["reach_around"],
        policies=["scd", "diffusion_policy"],
        demos=3,
        size="tiny",
        steps=6,
        batch_size=4,
        threads=1,
        overrides=TINY,
        episodes=2,
        seeds=[0, 1],
        train_seeds=[0, 3],
        n_envs=1,
        workers=0,
        image_size=32,
    )


@pytest.mark.slow
def test_sweep_writes_the_table_and_continues_without_retraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two pairs at a time, each in its own process with its own log; the re-run below is serial and
    # must read back exactly the table the parallel run wrote.
    cfg = replace(tiny_sweep(tmp_path / "sweep"), jobs=2)
    rows = run_quality(cfg, command="scd-quality test")
    cfg.jobs = 1

    assert [(r["task"], r["observation"], r["policy"]) for r in rows] == [
        ("push_t", "state", "scd"),
        ("push_t", "state", "diffusion_policy"),
        ("reach_around", "image", "scd"),
        ("reach_around", "image", "diffusion_policy"),
    ]
    for row in rows:
        # Two training seeds, each scored on both evaluation seeds, pooled.
        assert len(row["per_seed_success"]) == 2 and all(len(s) == 2 for s in row["per_seed_success"])
        pooled = [rate for rates in row["per_seed_success"] for rate in rates]
        assert row["success_rate"] == pytest.approx(sum(pooled) / 4)
        assert row["episodes_per_seed"] == 2 and row["seeds"] == [0, 1] and len(row["checkpoints"]) == 2
        # The issue-H row layout: the budget and protocol next to the numbers.
        assert row["obs"] == row["observation"] and row["train_seeds"] == cfg.train_seeds
        assert (row["demos"], row["episodes"], row["steps"], row["size"]) == (cfg.demos, 4, cfg.steps, "tiny")
        assert row["batch_size"] == cfg.batch_size and row["success_mean"] == row["success_rate"]
        assert row["success_std"] == row["success_rate_std"] and row["train_minutes"] > 0
    # push_t reports its goal coverage (best over the episode, and at the end); other tasks have none.
    for row in rows[:2]:
        assert 0.0 <= row["final_coverage"] <= row["max_coverage"] <= 1.0
        assert row["best_coverage_mean"] == row["max_coverage"]
    assert "max_coverage" not in rows[2]
    # reach_around is multimodal: the successes' split over its sides (fractions summing to 1, or none).
    assert all(0.0 <= v <= 1.0 for v in rows[2]["success_modes"].values())

    out = Path(cfg.out)
    assert json.loads((out / "quality.json").read_text())["rows"] == rows
    table = (out / "quality.md").read_text()
    assert "| task | observation | scd | diffusion_policy | scd - best baseline (points) |" in table
    assert "| push_t | state |" in table and "(coverage " in table and "| reach_around | image |" in table
    assert (out / "quality.png").stat().st_size > 1000
    logs = sorted(path.name for path in (out / "logs").iterdir())
    cells_run = ("push_t", "reach_around_image")
    assert logs == sorted(f"{cell}_{policy}.txt" for cell in cells_run for policy in cfg.policies)
    assert "push_t / scd / seed 3: training" in (out / "logs" / "push_t_scd.txt").read_text()
    # Same demonstrations for every policy of a cell; the image cell's policies read the camera only.
    assert sorted(p.name for p in (out / "data").iterdir()) == ["push_t.zarr", "reach_around_image.zarr"]
    trained = OmegaConf.load(out / "runs/push_t/scd/seed3/config.yaml")
    assert trained.train.seed == 3 and trained.policy.d_model == 64  # the seed and the tiny preset
    image_policy = load_policy(Path(rows[2]["checkpoints"][0]))
    assert image_policy.config.input_shapes == {"image": [3, 32, 32]}

    # Running the same sweep again reads every finished run back: nothing is trained a second time.
    def no_training(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(scd_policy.training.experiment, "run_training", no_training)
    assert run_quality(cfg, command="scd-quality test") == rows

    # Another execution length scores the same trained runs again, into their own files.
    monkeypatch.undo()
    scored = run_quality(replace(cfg, n_action_steps=2), command="scd-quality nexec")
    assert [r["n_action_steps"] for r in scored] == [2] * 4 and rows[0]["n_action_steps"] is None
    assert (out / "runs/push_t/scd/seed3/eval_nexec2.json").exists() and (out / "quality_nexec2.md").exists()
    assert "n_action_steps=2" in (out / "quality_nexec2.md").read_text()
    assert json.loads((out / "quality.json").read_text())["rows"] == rows  # the default table is kept
    monkeypatch.setattr(scd_policy.training.experiment, "run_training", no_training)

    # report_only: the table from what is evaluated, nothing run; a (cell, policy) with a training seed
    # not evaluated yet is left out (here: scd on the image cell loses its seed-3 evaluation).
    (out / "runs/reach_around_image/scd/seed3/eval.json").unlink()
    cfg.report_only = True
    reported = run_quality(cfg, command="scd-quality report")
    assert reported == [rows[0], rows[1], rows[3]]
    assert json.loads((out / "quality.json").read_text())["rows"] == reported
    assert "| reach_around | image | — |" in (out / "quality.md").read_text()
    cfg.tasks, cfg.image_tasks = ["memory_cue"], []
    with pytest.raises(ConfigError, match=r"no evaluated runs under .*run the sweep without report_only"):
        run_quality(cfg)


@pytest.mark.slow
def test_few_step_rows_distil_each_scd_run_on_its_frozen_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = replace(
        tiny_sweep(tmp_path / "sweep"),
        tasks=["reach_around"],
        image_tasks=[],
        policies=["scd"],
        train_seeds=[0],
        seeds=[0],
        few_step=[1, 2],
        distill_steps=4,
    )
    rows = run_quality(cfg, command="scd-quality few")
    assert [(r["decoder"], r["num_inference_steps"]) for r in rows] == [
        ("flow", 10),
        ("shortcut", 1),
        ("shortcut", 2),
    ]
    assert all(r["distill_steps"] == 4 and r["distill_minutes"] > 0 for r in rows[1:])
    run = run_dir_of(cfg, Cell("reach_around", False), "scd", 0)
    distilled = OmegaConf.load(run / "shortcut/config.yaml")
    assert distilled.train.init_from == str(run) and list(distilled.train.freeze) == [
        "encoder.",
        "tokenizer.",
    ]
    assert distilled.policy.diffusion.shortcut and distilled.train.steps == 4
    assert (run / "shortcut/eval_k1.json").exists() and (run / "shortcut/eval_k2.json").exists()
    table = (Path(cfg.out) / "quality.md").read_text()
    assert "| task | observation | scd K = 10 | K = 1 | K = 2 |" in table
    assert table.count("| reach_around | state |") == 2  # the main table's row and the few-step row
    # Everything is read back on a second run, and report_only lists the few-step rows too.
    monkeypatch.setattr(
        scd_policy.training.experiment, "run_training", lambda *a, **k: pytest.fail("trained again")
    )
    assert run_quality(cfg, command="scd-quality few") == rows
    assert run_quality(replace(cfg, report_only=True), command="scd-quality few") == rows


def test_runs_share_the_budget_and_resume_an_interrupted_run(tmp_path: Path) -> None:
    cfg = tiny_sweep(tmp_path)
    cfg.task_overrides = {"push_t": ["policy.horizon=12", "train.lr=1e-4"]}
    run_dir = run_dir_of(cfg, Cell("push_t", True), "scd", 3)
    assert run_dir == tmp_path / "runs" / "push_t_image" / "scd" / "seed3"
    dataset = tmp_path / "d.zarr"
    image = train_config(cfg, Cell("push_t", True), "scd", 3, dataset, run_dir)
    assert (image.data.path, image.out, image.task) == (str(dataset), str(run_dir), "")
    assert image.policy.type == "scd" and image.policy.d_model == 64  # the tiny preset
    assert (image.train.steps, image.train.batch_size, image.train.seed, image.train.num_threads) == (
        6,
        4,
        3,
        1,
    )
    assert image.data.obs_keys == ["image"]
    # Always resumed: a run folder without a checkpoint starts at step 0, one with a checkpoint goes on.
    assert image.train.resume
    # The task's overrides come after the shared ones (and the user's after those): the last one wins.
    assert image.train.lr == 1e-4
    assert image.policy.horizon == 8  # tiny_sweep's own overrides set policy.horizon=8 after the task's 12
    cfg.overrides = []  # (TINY sets both windows itself)
    cfg.policy = {"decoder_layers": 1, "image_channels": [8, 16], "dropout": 0.0, "train_window": 6}
    state = train_config(cfg, Cell("push_t", False), "diffusion_policy", 0, dataset, run_dir)
    assert (state.policy.type, state.policy.decoder_layers, state.policy.image_channels) == (
        "diffusion_policy",
        1,
        [8, 16],
    )
    assert state.data.obs_keys == ["state"]
    assert state.policy.context_window == 6  # follows a changed train_window, as in scd-train
    # A task that declares the history it needs gets causal windows that long (memory_cue: 32 steps).
    memory = train_config(cfg, Cell("memory_cue", False), "scd", 0, tmp_path / "m.zarr", run_dir)
    assert (memory.policy.train_window, memory.policy.context_window) == (32, 32)
    # A task that must be reacted to at every tick executes one action per chunk (reach_around).
    reach = train_config(
        cfg, Cell("reach_around", False), "diffusion_policy", 0, tmp_path / "r.zarr", run_dir
    )
    assert (
        reach.policy.n_action_steps == 1 and state.policy.n_action_steps == 8 == memory.policy.n_action_steps
    )
    cfg.overrides = ["train.no_such_field=1"]
    with pytest.raises(ConfigError, match="no_such_field"):
        train_config(cfg, Cell("push_t", False), "scd", 0, dataset, run_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": ["no_such_task"]}, "unknown task 'no_such_task'; registered tasks:"),
        ({"policies": ["scd", "ppo"]}, "expected a non-empty subset of"),
        ({"tasks": [], "image_tasks": []}, "nothing to run"),
        ({"seeds": []}, "at least one evaluation seed"),
        ({"train_seeds": [1, 1]}, "expected distinct training seeds"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"few_step": [1, 1]}, "distinct denoising step counts"),
        ({"few_step": [2], "policies": ["diffusion_policy"]}, "has no scd"),
        ({"jobs": 0}, "jobs must be >= 1, got 0"),
    ],
)
def test_bad_sweep_configs_say_what_is_wrong(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        QualityConfig(**changes)  # type: ignore[arg-type]


def _cli() -> list[str]:
    return [sys.executable, "-m", "scd_policy.cli.quality"]


def test_command_line_help_and_bad_values() -> None:
    result = subprocess.run([*_cli(), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scd-quality out=<dir>" in result.stdout and "image_obs_keys:" in result.stdout
    assert "encoder_layers: 5" in result.stdout  # the `size` group (small by default) fills `policy`
    args = ["size=tiny", "policy.decoder_layers=1", "overrides=['train.lr=1e-4']", "tasks=[no_such_task]"]
    bad = subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "configuration error: task='no_such_task': unknown task 'no_such_task'" in bad.stderr


@pytest.mark.slow
def test_command_line_sweep(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = [
        f"out={out}",
        "size=tiny",
        "tasks=[memory_cue]",
        "image_tasks=[]",
        "policies=[scd]",
        "demos=2",
        "steps=4",
        "batch_size=2",
        "threads=1",
        "episodes=1",
        "seeds=[0]",
        "n_envs=1",
        "workers=0",
        "overrides=[" + ",".join(f"'{o}'" for o in TINY) + "]",
    ]
    result = subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "quality.json").read_text())["rows"]
    assert [(r["task"], r["policy"]) for r in rows] == [("memory_cue", "scd")]
    assert json.loads((out / "runs/memory_cue/scd/seed0/checkpoints/latest.json").read_text())["step"] == 4


def _evaluated(rates: list[float], coverage: float, modes: dict[str, float]) -> dict[str, object]:
    """One run's scd-eval results, as run_evaluation writes them (the fields table_row reads)."""
    return {
        "per_seed": [{"seed": s, "success_rate": r} for s, r in enumerate(rates)],
        "episodes_per_seed": 50,
        "seeds": list(range(len(rates))),
        "mean_return": sum(rates),
        "checkpoint": f"run{coverage}",
        "num_inference_steps": 10,
        "max_coverage": coverage,
        "success_modes": modes,
    }


def test_pooled_rows_equal_one_sweep_over_all_training_seeds(tmp_path: Path) -> None:
    # A sweep split by training seed (two sessions) pools to the row one sweep would have written.
    runs = [
        _evaluated([0.6, 0.7, 0.8], 0.85, {"-1": 0.4, "1": 0.6}),
        _evaluated([0.9, 1.0, 0.5], 0.95, {"-1": 0.5, "1": 0.5}),
        _evaluated([0.2, 0.3, 0.4], 0.55, {"-1": 1.0}),
    ]
    cfg = QualityConfig(
        out=str(tmp_path), tasks=["push_t"], image_tasks=[], policies=["scd"], train_seeds=[0]
    )
    cell = Cell("push_t", image=False)
    split = [
        table_row(cfg, cell, "scd", runs[:1]),
        table_row(replace(cfg, train_seeds=[1, 2]), cell, "scd", runs[1:]),
    ]
    whole = table_row(replace(cfg, train_seeds=[0, 1, 2]), cell, "scd", runs)
    other = table_row(replace(cfg, overrides=["policy.history_noise=0.3"]), cell, "scd", runs[:1])

    pooled = pool_rows([split[0], other, split[1]])

    assert len(pooled) == 2 and pooled[1] == other  # another variant is never pooled in
    assert pooled[0].keys() == whole.keys()
    for key, value in whole.items():
        if isinstance(value, float):
            assert pooled[0][key] == pytest.approx(value), key
        elif key == "success_modes":
            assert pooled[0][key] == pytest.approx(value)
        else:
            assert pooled[0][key] == value, key
    with pytest.raises(ConfigError, match=r"repeat training seeds \[0, 0\]"):
        pool_rows([split[0], split[0]])


def test_metaworld_cells_get_category_means_next_to_the_published_anchor(tmp_path: Path) -> None:
    cfg = QualityConfig(
        out=str(tmp_path),
        tasks=["mw_hammer", "mw_bin_picking", "mw_shelf_place", "push_t"],
        image_tasks=[],
        policies=["scd", "diffusion_policy"],
    )
    rates = {
        ("mw_hammer", "scd"): 0.5,
        ("mw_bin_picking", "scd"): 1.0,
        ("mw_hammer", "diffusion_policy"): 0.25,
    }
    rows = [
        table_row(cfg, Cell(task, image=False), policy, [_evaluated([rate], 0.0, {})])
        for (task, policy), rate in rates.items()
    ]

    table = markdown(rows, cfg, "scd-quality mw")

    # Medium: both of scd's tasks are in (mean 75%), one of diffusion_policy's is missing (no mean).
    assert "| medium | mw_hammer, mw_bin_picking | 75.0% | — | 31.1% |" in table
    assert "| very hard | mw_shelf_place | — | — | 26.6% |" in table
    assert "| hard |" not in table and "push_t |" not in table.split("Meta-World by category")[1]
