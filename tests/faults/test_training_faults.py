"""scd-train, scd-eval and scd-collect under user mistakes and hostile conditions: every one is one
message naming what is wrong, a non-zero exit, no traceback — and nothing written before is lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from fault_helpers import TASK, assert_one_message, cli, run_cli, small_tmpfs, tiny_overrides

from scd_policy.data.replay_buffer import ReplayBuffer
from scd_policy.evaluation import EvalRunConfig, run_evaluation
from scd_policy.policies import load_policy
from scd_policy.training.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow


def test_unknown_task_is_refused_before_training(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("scd-train", *tiny_overrides(dataset, out, 2, "task=no_such_task"), cwd=tmp_path)
    assert_one_message(result, "task='no_such_task'", "unknown task", "registered tasks:", TASK)
    assert not (out / "checkpoints").exists()  # refused before any step (it used to fail at the end)


def test_dataset_of_another_task_is_refused_before_training(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("scd-train", *tiny_overrides(dataset, out, 2, "task=mw_push"), cwd=tmp_path)
    assert_one_message(result, "has per-step shape [2]", "task=mw_push's action space is [4]", "task=null")
    assert not (out / "checkpoints").exists()


def test_cuda_without_a_gpu(dataset: Path, tmp_path: Path) -> None:
    result = run_cli(
        "scd-train", *tiny_overrides(dataset, tmp_path / "r", 2, "train.device=cuda"), cwd=tmp_path
    )
    assert_one_message(result, "train.device='cuda'", "CUDA is not available", "train.device=cpu")


def test_nan_in_the_data_names_the_key(dataset: Path, tmp_path: Path) -> None:
    # ReplayBuffer refuses NaN on append; a buffer written by another tool may still hold it.
    damaged = tmp_path / "nan.zarr"
    import shutil

    shutil.copytree(dataset, damaged)
    state = zarr.open_array(damaged / "data" / "state", mode="r+")
    values = np.asarray(state[:])
    values[5, 1] = np.nan
    state[:] = values
    result = run_cli("scd-train", *tiny_overrides(damaged, tmp_path / "run", 2), cwd=tmp_path)
    assert_one_message(result, "data/state", "NaN or inf", "episode 0")


def test_diverging_loss_names_the_cause(dataset: Path, tmp_path: Path) -> None:
    result = run_cli(
        "scd-train", *tiny_overrides(dataset, tmp_path / "run", 20, "train.lr=1e30"), cwd=tmp_path
    )
    assert_one_message(result, "loss is", "the optimisation diverged", "lower train.lr")


def test_disk_full_during_training_keeps_the_earlier_checkpoint(dataset: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    subprocess.run([*cli("scd-train"), *tiny_overrides(dataset, probe, 2)], check=True, capture_output=True)
    one = sum(p.stat().st_size for p in (probe / "checkpoints" / "step_00000002").rglob("*") if p.is_file())
    with small_tmpfs(tmp_path / "disk", int(one * 1.6) + 256 * 1024) as disk:
        out = disk / "run"
        result = run_cli("scd-train", *tiny_overrides(dataset, out, 40), cwd=tmp_path)
        assert_one_message(result, "no space left on the device", str(out))
        steps = [step for step, _ in list_checkpoints(out)]
        assert steps, "the first checkpoint fitted and must still be there"
        load_policy(out / "checkpoints" / f"step_{steps[-1]:08d}" / "policy")
        assert not list((out / "checkpoints").glob(".*.tmp"))  # the half-written one is gone


def test_disk_full_during_collection_keeps_saved_episodes(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", 600 * 1024) as disk:
        out = disk / "images.zarr"
        args = [f"task={TASK}", "episodes=400", f"out={out}", "workers=0", "image=true", "image_size=48"]
        result = run_cli("scd-collect", *args, cwd=tmp_path)
        assert_one_message(result, "no space left on the device", "intact", "re-run the same command")
        buffer = ReplayBuffer.open(out)
        assert 1 <= buffer.n_episodes < 400
        episode = buffer.get_episode(buffer.n_episodes - 1)
        assert episode["image"].shape[1:] == (48, 48, 3)


def test_disk_full_during_evaluation(trained_run: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", 64 * 1024) as disk:
        # Fill the disk completely, so that the results file itself cannot be written.
        with contextlib.suppress(OSError), (disk / "filler").open("wb") as filler:
            while True:
                filler.write(os.urandom(4096))
                filler.flush()
        result = run_cli(
            "scd-eval", f"checkpoint={trained_run}", f"task={TASK}", "episodes=1", "seeds=[0]", "n_envs=1",
            f"out={disk / 'eval.json'}", cwd=tmp_path,
        )  # fmt: skip
        assert_one_message(result, "no space left on the device", "eval.json")


def test_results_come_before_videos_and_a_video_failure_is_a_warning(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "eval.json"
    (tmp_path / "eval_videos").write_text("a file where the video folder should go")
    cfg = EvalRunConfig(checkpoint=str(trained_run), task=TASK, episodes=1, seeds=[0], n_envs=1, videos=1)
    cfg.out = str(out)
    with caplog.at_level("WARNING"):
        results = run_evaluation(cfg)
    assert "videos not written" in caplog.text
    assert json.loads(out.read_text())["episodes_per_seed"] == 1
    assert results["videos"] == []


def test_kill_9_during_collection_keeps_committed_episodes(tmp_path: Path) -> None:
    out = tmp_path / "killed.zarr"
    process = subprocess.Popen(
        [*cli("scd-collect"), f"task={TASK}", "episodes=100000", f"out={out}", "workers=0"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "meta" / "episode_ends").is_dir() or ReplayBuffer.open(out).n_episodes < 3:
            assert process.poll() is None and time.monotonic() < deadline, "no episodes were saved"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    buffer = ReplayBuffer.open(out)
    saved = buffer.n_episodes
    assert saved >= 3
    for index in range(saved):
        assert np.isfinite(buffer.get_episode(index)["state"]).all()
    # The same command continues the dataset.
    result = run_cli("scd-collect", f"task={TASK}", "episodes=2", f"out={out}", "workers=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ReplayBuffer.open(out).n_episodes == saved + 2
