"""Tasks and datasets from outside the library (docs/tasks.md): every ``task=`` form on real envs (a
gymnasium MuJoCo env, a Dict-observation env), task modules reaching spawned workers, entry points,
the checks before training, a Diffusion-Policy zarr-2 buffer, and the external-task example end to end
through the CLIs."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from omegaconf import OmegaConf

from envs.external import ExternalTaskEnv, external_task_spec
from envs.registry import (
    TASK_MODULES_ENV,
    get_task,
    import_task_modules,
    make_env,
    make_expert,
    register_task,
)
from scd_policy.collection import CollectConfig, collect
from scd_policy.config import ConfigError, task_spec
from scd_policy.data.replay_buffer import DatasetError, ReplayBuffer
from scd_policy.evaluation import EvalRunConfig, run_evaluation
from scd_policy.policies import load_policy
from scd_policy.training.experiment import compose_experiment, run_training

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "external_task"
VENV_BIN = Path(sys.executable).parent
PENDULUM = "gym:InvertedPendulum-v5"
DICT_ENV = "external_env_helpers:make_dict_env"


# ----------------------------------------------------------------------------- the task= forms
def test_gym_form_adapts_a_gymnasium_mujoco_env() -> None:
    spec = get_task(PENDULUM)
    assert (spec.state_dim, spec.action_dim, spec.max_episode_steps, spec.fps) == (4, 1, 1000, 25.0)
    assert spec.cameras == ("render",) and spec.observation_keys == {"state": (4,)}
    env = make_env(PENDULUM, max_episode_steps=5)
    first, info = env.reset(seed=3)
    again, _ = env.reset(seed=3)
    assert set(first) == {"state"} and first["state"].dtype == np.float32 and first["state"].shape == (4,)
    np.testing.assert_array_equal(first["state"], again["state"])  # seeded resets reproduce
    assert info == {"success": False, "steps": 0}
    adapter = env.unwrapped
    assert isinstance(adapter, ExternalTaskEnv)
    # The library's [-1, 1] maps onto InvertedPendulum's [-3, 3] force.
    np.testing.assert_allclose(
        [adapter.to_env_action(np.array([a]))[0] for a in (-1, 0, 0.5, 1)], [-3, 0, 1.5, 3]
    )
    for _ in range(5):
        _, _, terminated, truncated, info = env.step(np.zeros(1, np.float32))
    assert truncated and not terminated and info["steps"] == 5 and info["success"] is False
    assert env.render() is None  # no render mode asked for: no frames made
    env.close()


def test_factory_form_with_dict_observations_images_and_success() -> None:
    spec = get_task(DICT_ENV)
    assert spec.observation_keys == {"observation": (3,), "keypoints": (8,), "pixels": (8, 8, 3)}
    assert spec.action_dim == 2 and spec.fps == 20.0 and spec.max_episode_steps == 1000
    env = make_env(DICT_ENV, image=True, image_size=16, render_mode="rgb_array", render_size=24)
    obs, info = env.reset(seed=0)
    assert obs["keypoints"].shape == (8,) and obs["keypoints"].dtype == np.float32  # (4, 2) flattened
    assert obs["pixels"].dtype == np.uint8 and obs["pixels"].shape == (8, 8, 3)  # kept as an image
    assert obs["image"].shape == (16, 16, 3)  # rendered, resized from the env's 32 x 48 frame
    assert env.render().shape == (24, 24, 3)
    expert = make_expert(DICT_ENV, 0, "external_env_helpers:make_point_expert")
    for _ in range(60):
        obs, _, terminated, truncated, info = env.step(expert(obs, info))
        if terminated or truncated:
            break
    # info["is_success"] became info["success"], and the episode ended at it, as the built-ins do.
    assert terminated and info["success"] is True and info["steps"] < 60
    env.close()


def test_registered_spec_renames_keys_and_uses_a_success_function() -> None:
    register_task(
        external_task_spec(
            DICT_ENV,
            name="point_renamed",
            rename={"observation": "state"},
            success_fn="external_env_helpers:far_right",
        )
    )
    spec = get_task("point_renamed")
    assert set(spec.observation_keys) == {"state", "keypoints", "pixels"} and spec.state_dim == 3
    env = make_env("point_renamed")
    obs, _ = env.reset(seed=1)
    for _ in range(40):
        obs, _, terminated, _, info = env.step(np.array([1.0, 0.0], np.float32))  # +0.1 in x per step
        if terminated:
            break
    assert terminated and info["success"] and obs["state"][0] > 1.0
    env.close()


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("no_such_task", "unknown task 'no_such_task'.*gym:<gymnasium id>"),
        ("gym:NoSuchEnv-v0", "gymnasium cannot make 'NoSuchEnv-v0'"),
        ("nosuch_module_xyz:make", "cannot import module 'nosuch_module_xyz'.*PYTHONPATH"),
        ("external_env_helpers:missing", "has no attribute 'missing'"),
        ("external_env_helpers:make_not_an_env", "returned object, not a gymnasium.Env"),
        ("external_env_helpers:make_discrete_env", "Discrete.*not a 1-D Box"),
        ("external_env_helpers:make_unbounded_env", "unbounded.*finite"),
    ],
)
def test_a_task_that_cannot_be_built_is_one_clear_error(task: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        task_spec(task)


def test_a_task_module_that_cannot_be_imported_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"task_module='no_such_module_q': cannot import it .*PYTHONPATH"):
        task_spec("my_task", "no_such_module_q")


def test_images_from_an_env_that_cannot_render_are_refused() -> None:
    spec = get_task("external_env_helpers:make_no_render_env")
    assert spec.cameras == ()
    with pytest.raises(ValueError, match=r"cannot render.*eval\.videos=0"):
        make_env("external_env_helpers:make_no_render_env", image=True)
    with pytest.raises(ValueError, match=r"cannot render images.*without image=true"):
        collect(
            CollectConfig(
                task="external_env_helpers:make_no_render_env",
                expert="external_env_helpers:make_point_expert",
                out="unused.zarr",
                image=True,
            ),
            progress=False,
        )


def test_collect_without_an_expert_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no scripted expert; pass expert=<module>:<factory>"):
        collect(CollectConfig(task=PENDULUM, out=str(tmp_path / "p.zarr"), workers=0), progress=False)
    assert not (tmp_path / "p.zarr").exists()


# ----------------------------------------------------------------------------- task modules
def test_task_module_reaches_spawned_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_ext_tasks.py").write_text(
        "from envs.external import external_task_spec\n"
        "from envs.registry import register_task\n"
        f"register_task(external_task_spec({DICT_ENV!r}, name='my_ext_point',"
        " expert='external_env_helpers:make_point_expert'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(TASK_MODULES_ENV, "")
    import_task_modules(["my_ext_tasks"])
    assert os.environ[TASK_MODULES_ENV] == "my_ext_tasks"
    # A fresh interpreter (as collection and evaluation workers are) finds the task through the variable.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        from external_env_helpers import spec_in_child

        assert pool.apply(spec_in_child, ("my_ext_point",)) == (2, "external_env_helpers:make_point_expert")
    out = tmp_path / "point.zarr"
    report = collect(
        CollectConfig(task="my_ext_point", task_module="my_ext_tasks", episodes=3, out=str(out), workers=2),
        progress=False,
    )
    assert report.saved == 3
    buffer = ReplayBuffer.open(out)
    assert buffer.shapes == {"observation": (3,), "keypoints": (8,), "pixels": (8, 8, 3), "action": (2,)}
    assert buffer.meta["card"]["task_module"] == "my_ext_tasks"


def test_entry_point_group_registers_tasks_of_installed_packages(tmp_path: Path) -> None:
    (tmp_path / "ep_tasks.py").write_text(
        "from envs.external import external_task_spec\n"
        "from envs.registry import register_task\n"
        f"register_task(external_task_spec({PENDULUM!r}, name='ep_pendulum'))\n"
    )
    dist = tmp_path / "ep_tasks-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-tasks\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[scd_policy.tasks]\nep_tasks = ep_tasks\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    code = "from envs.registry import get_task; print(get_task('ep_pendulum').state_dim)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"


# ----------------------------------------------------------------------------- datasets and checks
def _tiny(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"dataset={dataset}",
        f"out={out}",
        "size=tiny",
        "train.steps=4",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.val_every=4",
        "train.checkpoint_every=4",
        "train.num_workers=0",
        *extra,
    ]


def _diffusion_policy_pusht_buffer(path: Path, episodes: int = 3, length: int = 12) -> None:
    """A buffer in the layout Diffusion Policy's ReplayBuffer writes for PushT (zarr format 2): ``img``
    float 0..255, a 5-D ``state``, ``keypoint`` (N, 9, 2), a 2-D ``action``, ``meta/episode_ends``."""
    rng = np.random.default_rng(0)
    n = episodes * length
    root = zarr.open_group(path, mode="w", zarr_format=2)
    data = root.require_group("data")
    arrays = {
        "img": rng.uniform(0, 255, (n, 16, 16, 3)).astype(np.float32),
        "state": rng.uniform(0, 512, (n, 5)).astype(np.float32),
        "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
        "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
    }
    for key, values in arrays.items():
        data.create_array(key, shape=values.shape, dtype=values.dtype, chunks=(length, *values.shape[1:]))[
            :
        ] = values
    ends = np.arange(1, episodes + 1, dtype=np.int64) * length
    root.require_group("meta").create_array("episode_ends", shape=ends.shape, dtype=np.int64)[:] = ends


@pytest.mark.slow
def test_diffusion_policy_buffer_trains_with_keypoints_and_float_images(tmp_path: Path) -> None:
    dataset = tmp_path / "pusht_dp.zarr"
    _diffusion_policy_pusht_buffer(dataset)
    cfg = compose_experiment(_tiny(dataset, tmp_path / "run", "data.obs_keys=[state,keypoint,img]"))
    policy = load_policy(run_training(cfg))
    assert policy.config.input_shapes == {"state": [5], "keypoint": [18], "img": [3, 16, 16]}
    # A task whose spaces do not fit is refused before the first step, naming both shapes.
    wrong = compose_experiment(
        _tiny(dataset, tmp_path / "wrong", "data.obs_keys=[state,keypoint]", "task=push_t")
    )
    with pytest.raises(
        DatasetError, match=r"data/state .* shape \[5\] but task=push_t's 'state' observation is \[6\]"
    ):
        run_training(wrong)
    keys = compose_experiment(_tiny(dataset, tmp_path / "keys", "data.obs_keys=[keypoint]", "task=push_t"))
    with pytest.raises(DatasetError, match=r"data/keypoint .* env observes only \['state'\]"):
        run_training(keys)
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "keys").exists()


@pytest.mark.slow
def test_dict_env_collect_train_and_parallel_eval(tmp_path: Path) -> None:
    dataset = tmp_path / "point.zarr"
    report = collect(
        CollectConfig(
            task=DICT_ENV,
            expert="external_env_helpers:make_point_expert",
            episodes=4,
            out=str(dataset),
            workers=0,
            max_episode_steps=40,
        ),
        progress=False,
    )
    assert report.saved == 4
    cfg = compose_experiment(
        _tiny(dataset, tmp_path / "run", f"task={DICT_ENV}", "data.obs_keys=[observation,keypoints,pixels]")
    )
    policy_dir = run_training(cfg)
    assert load_policy(policy_dir).config.input_shapes["keypoints"] == [8]
    results = run_evaluation(
        EvalRunConfig(
            checkpoint=str(tmp_path / "run"),
            episodes=2,
            seeds=[0],
            n_envs=2,  # spawn workers build the env from the task string alone
            max_steps=15,
            videos=1,
            out=str(tmp_path / "eval.json"),
        )
    )
    assert results["task"] == DICT_ENV and results["episodes_per_seed"] == 2
    assert len(results["videos"]) == 1 and Path(results["videos"][0]).stat().st_size > 0


# ----------------------------------------------------------------------------- the example, via the CLIs
def _cli(command: str, *args: str, cwd: Path = EXAMPLE) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(VENV_BIN / command), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{command} {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_external_task_example_through_the_clis(tmp_path: Path) -> None:
    dataset, run = tmp_path / "pendulum.zarr", tmp_path / "run"
    _cli(
        "scd-collect",
        "task=pendulum_balance",
        "task_module=pendulum_task",
        "episodes=6",
        "exec_noise=0.1",
        "workers=2",
        f"out={dataset}",
    )
    _cli(
        "scd-train",
        "task=pendulum_balance",  # its module comes from the dataset card
        *_tiny(dataset, run, "train.steps=20", "train.checkpoint_every=20", "train.val_every=20"),
        "train.eval_every=20",
        "policy.n_action_steps=1",
        "eval.episodes=2",
        "eval.n_envs=2",
        "eval.seeds=[0]",
    )
    assert OmegaConf.load(run / "config.yaml")["task_module"] == "pendulum_task"
    out = tmp_path / "eval.json"
    _cli("scd-eval", f"checkpoint={run}", f"out={out}", "episodes=3", "seeds=[0]", "n_envs=2", "videos=1")
    results = json.loads(out.read_text())
    assert results["task"] == "pendulum_balance" and results["episodes_per_seed"] == 3
    assert 0.0 <= results["success_rate"] <= 1.0 and results["mean_episode_length"] >= 1
    assert len(results["videos"]) == 1 and Path(results["videos"][0]).exists()
    # The factory form of the same env, and gymnasium's env as it is (no success: keep every episode).
    factory_out = tmp_path / "factory.json"
    _cli(
        "scd-eval",
        f"checkpoint={run}",
        "task=pendulum_task:make_env",
        f"out={factory_out}",
        "episodes=2",
        "seeds=[0]",
        "n_envs=1",
        "videos=0",
    )
    assert json.loads(factory_out.read_text())["task"] == "pendulum_task:make_env"
    gym_data = tmp_path / "gym.zarr"
    _cli(
        "scd-collect",
        f"task={PENDULUM}",
        "expert=pendulum_task:make_expert",
        "only_successes=false",
        "episodes=2",
        "max_episode_steps=20",
        "workers=0",
        f"out={gym_data}",
    )
    assert ReplayBuffer.open(gym_data).episode_lengths.tolist() == [20, 20]
