"""scd-collect end to end: real experts, real MuJoCo, real zarr buffers on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from envs.registry import get_task, make_env, make_expert, task_names
from scd_policy.collection import CollectConfig, CollectError, collect, config_from_dict, run_collection
from scd_policy.config import ConfigError
from scd_policy.data.replay_buffer import ReplayBuffer

OWN_TASKS = task_names("own")
FAST_TASK = "memory_cue"  # the shortest episodes: for tests about the CLI rather than a task
CARD_FIELDS = {
    "task",
    "episode_seeds",
    "next_seed",
    "attempts",
    "successes",
    "expert_success_rate",
    "image",
    "camera",
    "image_size",
    "versions",
    "created",
    "updated",
    "runs",
}


def _config(task: str, out: Path, **overrides: Any) -> CollectConfig:
    values: dict[str, Any] = {"task": task, "out": str(out), "episodes": 2, "workers": 0, **overrides}
    return config_from_dict(values)


def _card(path: Path) -> dict[str, Any]:
    card = ReplayBuffer.open(path).meta["card"]
    assert isinstance(card, dict)
    return card


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("scd-collect")
    return [str(script)] if script.exists() else [sys.executable, "-m", "scd_policy.cli.collect"]


@pytest.mark.parametrize("task", OWN_TASKS)
def test_collect_state_episodes_replay_exactly(task: str, tmp_path: Path) -> None:
    spec = get_task(task)
    out = tmp_path / f"{task}.zarr"
    report = collect(_config(task, out, seed=10), progress=False)
    assert (report.saved, report.total_episodes) == (2, 2)

    buffer = ReplayBuffer.open(out)
    assert buffer.n_episodes == 2
    assert buffer.shapes == {"state": (spec.state_dim,), "action": (spec.action_dim,)}
    assert buffer.dtypes["state"] == np.float32 and buffer.dtypes["action"] == np.float32
    actions = buffer.load("action")
    assert np.all(np.abs(actions) <= 1.0)
    meta = buffer.meta
    assert meta["task"] == task and meta["fps"] == spec.fps and meta["source"] == "scd-collect"
    card = meta["card"]
    assert set(card) >= CARD_FIELDS
    assert card["image"] is False and card["camera"] is None
    assert set(card["versions"]) >= {"mujoco", "gymnasium", "metaworld", "numpy", "scd_policy"}
    seeds = card["episode_seeds"]
    assert len(seeds) == 2 and seeds[0] >= 10 and seeds[0] < seeds[1]
    assert card["next_seed"] == seeds[1] + 1 == 10 + card["attempts"]
    assert card["expert_success_rate"] == pytest.approx(2 / card["attempts"])

    # The stored state at step t is the one the expert acted on with the stored action t: replaying the
    # actions from the same seed reproduces every state and ends in success on the last action.
    episode = buffer.get_episode(0)
    env = make_env(task)
    try:
        obs, _ = env.reset(seed=seeds[0])
        for t, action in enumerate(episode["action"]):
            np.testing.assert_array_equal(obs["state"], episode["state"][t])
            obs, _, terminated, _, info = env.step(action)
            assert terminated == (t == len(episode["action"]) - 1)
        assert info["success"] is True
    finally:
        env.close()


def test_exec_noise_perturbs_the_states_but_stores_the_experts_labels(tmp_path: Path) -> None:
    clean, noisy = tmp_path / "clean.zarr", tmp_path / "noisy.zarr"
    collect(_config("push_t", noisy, episodes=1, exec_noise=0.05), progress=False)
    seed = _card(noisy)["episode_seeds"][0]
    collect(_config("push_t", clean, episodes=1, seed=seed), progress=False)
    assert _card(clean)["episode_seeds"] == [seed]
    assert _card(noisy)["exec_noise"] == 0.05 and _card(clean)["exec_noise"] == 0.0
    a, b = ReplayBuffer.open(clean).get_episode(0), ReplayBuffer.open(noisy).get_episode(0)
    # Same seed, same start; the executed noise moves the pusher off the clean path from step 1 on.
    np.testing.assert_array_equal(a["state"][0], b["state"][0])
    assert not np.allclose(a["state"][1:3], b["state"][1:3])
    # Each stored action is what a fresh replay of the expert commands in the stored (noisy) states.
    expert = make_expert("push_t", seed)
    for t in range(len(b["action"])):
        label = expert({"state": b["state"][t]}, {"steps": t})
        np.testing.assert_allclose(label, b["action"][t], atol=1e-6)
    with pytest.raises(ConfigError, match="exec_noise"):
        _config("push_t", noisy, exec_noise=-0.1)


def test_collect_images(tmp_path: Path) -> None:
    task = OWN_TASKS[0]
    out = tmp_path / "images.zarr"
    collect(_config(task, out, episodes=1, image=True, image_size=32), progress=False)
    buffer = ReplayBuffer.open(out)
    assert buffer.shapes["image"] == (32, 32, 3) and buffer.dtypes["image"] == np.uint8
    images = buffer.load("image")
    assert images.shape[0] == buffer.n_steps and images.std() > 10.0
    card = buffer.meta["card"]
    assert (card["image"], card["camera"], card["image_size"]) == (True, get_task(task).cameras[0], 32)


def test_append_continues_with_new_seeds_and_refuses_mismatches(tmp_path: Path) -> None:
    out = tmp_path / "append.zarr"
    collect(_config(FAST_TASK, out), progress=False)
    first = _card(out)
    # Same command again (seed=0 again): appends, starting where the first run stopped.
    report = collect(_config(FAST_TASK, out), progress=False)
    assert (report.saved, report.total_episodes) == (2, 4)
    card = _card(out)
    seeds = card["episode_seeds"]
    assert seeds[:2] == first["episode_seeds"] and len(set(seeds)) == 4
    assert seeds[2] >= first["next_seed"] and [run["first_seed"] for run in card["runs"]] == [
        0,
        first["next_seed"],
    ]
    assert card["attempts"] == card["next_seed"]  # every seed in [0, next_seed) tried exactly once
    assert card["created"] == first["created"]

    with pytest.raises(CollectError, match=r"keys/shapes .* image"):
        collect(_config(FAST_TASK, out, image=True, image_size=32), progress=False)
    with pytest.raises(CollectError, match="holds task 'memory_cue', not 'reach_around'"):
        collect(_config("reach_around", out), progress=False)
    assert ReplayBuffer.open(out).n_episodes == 4  # refused runs wrote nothing

    collect(_config(FAST_TASK, out, episodes=1, overwrite=True, seed=100), progress=False)
    card = _card(out)
    assert ReplayBuffer.open(out).n_episodes == 1 and card["episode_seeds"][0] >= 100


def test_running_out_of_attempts_keeps_the_count_and_fails(tmp_path: Path) -> None:
    # Three steps are too few for any expert: every attempt fails, none is stored.
    out = tmp_path / "short.zarr"
    cfg = _config(FAST_TASK, out, episodes=2, max_attempts=3, max_episode_steps=3, seed=5)
    assert run_collection(cfg, progress=False) == 1
    card = _card(out)
    assert ReplayBuffer.open(out).n_episodes == 0
    assert (card["attempts"], card["successes"], card["next_seed"]) == (3, 0, 8)
    assert card["expert_success_rate"] == 0.0 and card["episode_seeds"] == []


def test_bad_options_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="episodes=0"):
        _config(FAST_TASK, tmp_path / "x.zarr", episodes=0)
    with pytest.raises(ConfigError, match=r"missing required option\(s\) out=\.\.\., task=\.\.\."):
        config_from_dict({"episodes": 3})
    with pytest.raises(CollectError, match=r"unknown task 'no_such_task'; registered tasks: .*reach_around"):
        collect(_config("no_such_task", tmp_path / "x.zarr"), progress=False)
    with pytest.raises(CollectError, match="no camera 'nope'"):
        collect(_config(FAST_TASK, tmp_path / "x.zarr", camera="nope"), progress=False)
    assert run_collection(_config(FAST_TASK, tmp_path / "x.zarr", camera="nope"), progress=False) == 2
    assert not (tmp_path / "x.zarr").exists()


def test_interrupt_keeps_finished_episodes_and_rerun_continues(tmp_path: Path) -> None:
    out = tmp_path / "interrupted.zarr"
    cfg = _config(FAST_TASK, out, episodes=100_000)

    def interrupt_once_data_arrives() -> None:
        deadline = time.monotonic() + 60
        # Wait until the first append has begun (then it completes), but interrupt in any case.
        while not (out / "data" / "state").is_dir() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    # Whatever handler was there before (Python's default; SIG_IGN in a backgrounded CI job) comes back.
    before = signal.getsignal(signal.SIGINT)
    sender = threading.Thread(target=interrupt_once_data_arrives)
    sender.start()
    report = collect(cfg, progress=False)
    sender.join()
    assert report.interrupted and 1 <= report.saved < 100_000
    assert signal.getsignal(signal.SIGINT) is before  # our handler was removed
    buffer = ReplayBuffer.open(out)
    card = buffer.meta["card"]
    assert buffer.n_episodes == report.saved == len(card["episode_seeds"])
    assert card["runs"][-1]["interrupted"] is True and card["next_seed"] == report.next_seed

    again = collect(_config(FAST_TASK, out, episodes=1), progress=False)
    card = _card(out)
    assert again.total_episodes == report.saved + 1
    assert card["episode_seeds"][-1] >= report.next_seed


def test_console_script_with_workers_matches_in_process_collection(tmp_path: Path) -> None:
    task, episodes = "reach_around", 3
    result = subprocess.run(
        [*_cli(), f"task={task}", f"episodes={episodes}", "out=pool.zarr", "workers=2", "seed=4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Saved {episodes} episodes of {task} to pool.zarr" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.zarr"]  # no outputs/, .hydra/ or logs

    collect(_config(task, tmp_path / "local.zarr", episodes=episodes, seed=4), progress=False)
    pooled, local = ReplayBuffer.open(tmp_path / "pool.zarr"), ReplayBuffer.open(tmp_path / "local.zarr")
    assert pooled.meta["card"]["episode_seeds"] == local.meta["card"]["episode_seeds"]
    for key in ("state", "action"):
        np.testing.assert_array_equal(pooled.load(key), local.load(key))
    np.testing.assert_array_equal(pooled.episode_ends, local.episode_ends)


def test_console_script_sigterm_keeps_saved_episodes(tmp_path: Path) -> None:
    out = tmp_path / "term.zarr"
    process = subprocess.Popen(
        [*_cli(), f"task={FAST_TASK}", "episodes=100000", f"out={out}", "workers=2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "data" / "state").is_dir():  # the first append has begun
            assert process.poll() is None and time.monotonic() < deadline, "no episode was saved"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "Interrupted:" in stderr and "Re-run the same command" in stderr
    buffer = ReplayBuffer.open(out)
    card = buffer.meta["card"]
    assert buffer.n_episodes >= 1 and len(card["episode_seeds"]) == buffer.n_episodes
    assert card["runs"][-1]["interrupted"] is True


def test_help_describes_the_options() -> None:
    result = subprocess.run([*_cli(), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for text in (
        "Usage: scd-collect task=<name> episodes=<N> out=<path.zarr>",
        "workers=<int>",
        "max_attempts=",
    ):
        assert text in result.stdout
