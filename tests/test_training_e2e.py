"""End to end on real MuJoCo and real files: collect -> train (tiny) -> evaluate, resume after kill -9,
and a 2-rank DDP run on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scd_policy.collection import CollectConfig, collect
from scd_policy.evaluation import EvalRunConfig, run_evaluation
from scd_policy.policies import CheckpointError, Policy, load_policy
from scd_policy.runtime import PolicyRuntime
from scd_policy.training.experiment import compose_experiment, run_training
from scd_policy.training.trainer import train

pytestmark = pytest.mark.slow

TASK = "reach_around"
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / f"{TASK}.zarr"
    report = collect(CollectConfig(task=TASK, episodes=6, out=str(path), workers=0), progress=False)
    assert report.saved == 6
    return path


def tiny_overrides(dataset: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"dataset={dataset}",
        f"out={out}",
        "size=tiny",
        "policy.train_window=4",
        "policy.context_window=8",
        "policy.horizon=8",
        "policy.n_action_steps=4",
        f"train.steps={steps}",
        "train.batch_size=8",
        "train.warmup_steps=2",
        "train.log_every=5",
        "train.val_every=10",
        "train.checkpoint_every=10",
        *extra,
    ]


def test_collect_train_eval(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_experiment(
        tiny_overrides(
            dataset, run_dir, 20, f"task={TASK}", "eval.episodes=2", "eval.seeds=[0]", "eval.n_envs=2"
        )
    )
    final = run_training(cfg)

    # The deployable EMA policy, the resumable state, logs and the best-by-success copy are all there.
    assert final == run_dir / "checkpoints" / "step_00000020" / "policy"
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 20
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000010",
        "step_00000020",
    ]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    best = json.loads((run_dir / "best.json").read_text())
    assert best["step"] == 20 and 0.0 <= best["success_rate"] <= 1.0
    step_eval = json.loads((run_dir / "eval" / "step_00000020.json").read_text())
    assert step_eval["episodes_per_seed"] == 2 and step_eval["seeds"] == [0]

    # The trained policy knows its shapes from the data and acts inside the action space.
    policy = load_policy(final)
    assert policy.config.input_shapes == {"state": [6]} and policy.config.action_dim == 2
    runtime = PolicyRuntime.from_pretrained(final)
    action = runtime.step({"state": [0.0, -0.2, 0.0, -0.1, 0.0, 0.2]})
    assert action.shape == (2,)

    # scd-eval on the run folder: fixed seeds, two seeds, videos of the first episodes.
    out = tmp_path / "eval.json"
    results = run_evaluation(
        EvalRunConfig(
            checkpoint=str(run_dir), episodes=2, seeds=[0, 1], n_envs=2, videos=1, video_size=64, out=str(out)
        )
    )
    on_disk = json.loads(out.read_text())
    assert on_disk["success_rate"] == results["success_rate"]
    assert [s["seed"] for s in on_disk["per_seed"]] == [0, 1]
    assert on_disk["latency_ms_p50"] > 0 and on_disk["latency_ms_p90"] >= on_disk["latency_ms_p50"]
    video = Path(on_disk["videos"][0])
    assert video.exists() and video.stat().st_size > 1000
    import imageio.v2 as imageio

    assert imageio.get_reader(video).get_data(0).shape == (64, 64, 3)  # eval.video_size reaches the renderer
    # Same checkpoint, same seeds -> the same numbers.
    again = run_evaluation(
        EvalRunConfig(checkpoint=str(run_dir), episodes=2, seeds=[0, 1], n_envs=2, videos=0, out=str(out))
    )
    assert again["per_seed"] == results["per_seed"]
    assert again["execution"]["context_window"] is None  # the policy's own 8 steps
    # A shorter run-time history than the trained one (how much of its history does a policy use?):
    # the same seeds, another rollout.
    short = run_evaluation(
        EvalRunConfig(
            checkpoint=str(run_dir),
            episodes=2,
            seeds=[0, 1],
            n_envs=2,
            videos=0,
            context_window=1,
            out=str(out),
        )
    )
    assert short["execution"]["context_window"] == 1
    assert short["per_seed"] != results["per_seed"]


def _train_cmd(dataset: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [str(VENV_BIN / "scd-train"), *tiny_overrides(dataset, out, steps, *extra)]


def test_resume_after_kill_continues_exactly(dataset: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 30
    # Reference: an uninterrupted run.
    reference = tmp_path / "reference"
    subprocess.run(
        _train_cmd(dataset, reference, steps), check=True, env=env, capture_output=True, timeout=300
    )

    # The same run, killed with SIGKILL once it has written a checkpoint, then resumed.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(dataset, killed, steps), env=env, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 240
    while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = json.loads(pointer.read_text())["step"]
    assert interrupted_at in (10, 20, 30)
    resumed = subprocess.run(
        _train_cmd(dataset, killed, steps, "train.resume=true"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if interrupted_at < steps:
        assert f"at step {interrupted_at}" in resumed.stderr

    # Weights, EMA weights and optimiser step count match the uninterrupted run.
    for name in ("raw.safetensors", "policy/model.safetensors"):
        want = load_file(str(reference / "checkpoints" / "step_00000030" / name))
        got = load_file(str(killed / "checkpoints" / "step_00000030" / name))
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=f"{name}:{key}")


def test_resume_rejects_a_checkpoint_of_another_policy(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_training(compose_experiment(tiny_overrides(dataset, run_dir, 10)))
    other = compose_experiment(
        tiny_overrides(dataset, run_dir, 20, "policy=diffusion_policy", "train.resume=true")
    )
    config_before = (run_dir / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"holds a 'scd' policy .* policy=diffusion_policy"):
        run_training(other)
    # The failed resume did not overwrite the config the run was trained with.
    assert (run_dir / "config.yaml").read_text() == config_before


def test_ddp_two_cpu_ranks(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    cmd = [
        str(VENV_BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "scd_policy.cli.train",
        *tiny_overrides(dataset, run_dir, 10),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stderr
    # One writer: a single checkpoint folder per saved step and one tensorboard log.
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 10
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    policy = load_policy(run_dir / "checkpoints" / "step_00000010" / "policy")
    assert policy.config.type == "scd"


def test_a_failing_rollout_at_the_end_keeps_the_trained_steps(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_experiment(tiny_overrides(dataset, run_dir, 12, "train.eval_every=6"))

    def rollout(policy: Policy, step: int) -> dict[str, float]:
        if step == 12:
            raise RuntimeError("simulator crashed")
        return {"success_rate": 0.5}

    with pytest.raises(RuntimeError, match="simulator crashed"):
        train(cfg, run_dir, rollout)
    # The last steps were checkpointed before the rollout that failed; the earlier best is kept.
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 12
    assert json.loads((run_dir / "best.json").read_text()) == {"step": 6, "success_rate": 0.5}
