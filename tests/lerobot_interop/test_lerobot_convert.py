"""scd-convert both ways on real LeRobotDatasets written with LeRobot's own API, and its planning rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lerobot_helpers import REPO_ID, TASK_TEXT

from scd_policy.data.replay_buffer import ReplayBuffer
from scd_policy.interop.convert_cli import run
from scd_policy.interop.lerobot_convert import (
    CARD_FILE,
    ConversionError,
    lerobot_fps,
    plan_export,
    plan_import,
)

pytestmark = pytest.mark.lerobot

VECTOR = {"dtype": "float32", "shape": [6], "names": None}
ACTION = {"dtype": "float32", "shape": [2], "names": None}
CAMERA = {"dtype": "image", "shape": [64, 64, 3], "names": ["height", "width", "channels"]}


# ------------------------------------------------------------------------------------ planning rules


def test_plan_import_maps_lerobot_names_to_ours() -> None:
    plan = plan_import(
        {
            "observation.state": VECTOR,
            "observation.images.top": CAMERA,
            "action": ACTION,
            "next.reward": {"dtype": "float32", "shape": [1], "names": None},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        }
    )
    assert plan.keys == {"action": "action", "state": "observation.state", "image": "observation.images.top"}
    assert plan.images == {"image": "top"} and plan.videos == []
    assert plan.skipped == ["next.reward"]  # bookkeeping columns (timestamp, ...) are not "skipped"


def test_plan_import_camera_choice() -> None:
    features = {
        "observation.state": VECTOR,
        "observation.images.wrist": {**CAMERA, "dtype": "video"},
        "observation.images.top": CAMERA,
        "action": ACTION,
    }
    # Several cameras and none chosen: one key per camera, each its own token group in training.
    both = plan_import(features)
    assert both.images == {"image_top": "top", "image_wrist": "wrist"} and both.videos == ["image_wrist"]
    assert both.keys["image_wrist"] == "observation.images.wrist" and "image" not in both.keys
    plan = plan_import(features, camera="wrist")
    assert plan.keys["image"] == "observation.images.wrist" and plan.videos == ["image"]
    assert plan.skipped == ["observation.images.top"]
    assert plan_import(features, camera="observation.images.top").keys["image"] == "observation.images.top"
    assert "image" not in plan_import(features, images=False).keys
    with pytest.raises(ConversionError, match=r"no camera 'front'.*\['observation.images.top', "):
        plan_import(features, camera="front")


def test_plan_import_errors_name_what_is_missing() -> None:
    with pytest.raises(ConversionError, match=r"no 'action' feature; it has \['observation.state'\]"):
        plan_import({"observation.state": VECTOR})
    with pytest.raises(ConversionError, match="no observation to convert"):
        plan_import({"action": ACTION, "observation.images.top": CAMERA}, images=False)
    with pytest.raises(ConversionError, match=r"'observation.state' has dtype 'float32' and shape \[2, 3\]"):
        plan_import({"action": ACTION, "observation.state": {**VECTOR, "shape": [2, 3]}})
    with pytest.raises(ConversionError, match="has 4 channels"):
        plan_import({"action": ACTION, "observation.image": {**CAMERA, "shape": [64, 64, 4]}})


def test_plan_export_features_and_errors() -> None:
    shapes = {"state": (6,), "image": (32, 48, 3), "action": (2,), "reward": (1,)}
    dtypes = {"state": np.dtype("float32"), "image": np.dtype("uint8"), "action": np.dtype("float32")}
    dtypes["reward"] = np.dtype("float32")
    plan = plan_export(shapes, dtypes, video=True)
    assert plan.keys == {"observation.state": "state", "observation.image": "image", "action": "action"}
    assert plan.features["observation.image"] == {
        "dtype": "video",
        "shape": (32, 48, 3),
        "names": ["height", "width", "channels"],
    }
    assert plan.features["action"]["names"] == ["action_0", "action_1"]
    assert plan.skipped == ["reward"]
    assert plan_export(shapes, dtypes).features["observation.image"]["dtype"] == "image"
    top = plan_export(shapes, dtypes, camera="top")
    assert top.keys == {"observation.state": "state", "observation.images.top": "image", "action": "action"}
    with pytest.raises(ConversionError, match=r"camera name 'a\.b'"):
        plan_export(shapes, dtypes, camera="a.b")
    with pytest.raises(ConversionError, match=r"no action key 'act'"):
        plan_export(shapes, dtypes, action_key="act")
    with pytest.raises(ConversionError, match="needs uint8 RGB frames"):
        plan_export({**shapes, "image": (32, 48, 1)}, dtypes)
    with pytest.raises(ConversionError, match="no image key"):
        plan_export({"state": (6,), "action": (2,)}, dtypes, video=True)


def test_lerobot_fps_must_be_whole() -> None:
    assert lerobot_fps(10.0) == 10
    assert lerobot_fps(50) == 50
    for bad in (12.5, 0, -3, float("nan")):
        with pytest.raises(ConversionError, match="whole, positive frame rate"):
            lerobot_fps(bad)
    with pytest.raises(ConversionError, match="no fps"):
        lerobot_fps(None)


# ------------------------------------------------------------------------------------ LeRobot -> zarr


def test_from_lerobot_images_is_exact(
    lerobot_images: Path, demos: list[dict[str, np.ndarray]], tmp_path: Path
) -> None:
    out = tmp_path / "demos.zarr"
    args = ["from-lerobot", "--repo-id", REPO_ID, "--root", str(lerobot_images), "--out", str(out)]
    assert run(args) == 0
    buffer = ReplayBuffer.open(out)
    assert buffer.n_episodes == len(demos)
    assert buffer.episode_lengths.tolist() == [len(d["action"]) for d in demos]
    assert buffer.shapes == {"action": (2,), "image": (64, 64, 3), "state": (6,)}
    assert buffer.dtypes["image"] == np.uint8 and buffer.dtypes["state"] == np.float32
    for index, demo in enumerate(demos):
        episode = buffer.get_episode(index)
        for key in ("state", "image", "action"):
            np.testing.assert_array_equal(episode[key], demo[key], err_msg=f"episode {index} key {key}")
    meta = buffer.meta
    assert meta["fps"] == 10.0 and meta["source"] == "lerobot"
    assert meta["card"]["camera"] == "top"
    assert meta["card"]["lerobot"]["repo_id"] == REPO_ID
    assert meta["card"]["lerobot"]["episode_tasks"] == [[TASK_TEXT]] * len(demos)
    # A second conversion onto the same buffer needs --overwrite.
    assert run(args) == 1
    assert run([*args, "--overwrite"]) == 0


def test_from_lerobot_video_decodes_the_right_frames(
    lerobot_video: Path, demos: list[dict[str, np.ndarray]], tmp_path: Path
) -> None:
    out = tmp_path / "video.zarr"
    assert run(["from-lerobot", "--repo-id", REPO_ID, "--root", str(lerobot_video), "--out", str(out)]) == 0
    buffer = ReplayBuffer.open(out)
    assert buffer.episode_lengths.tolist() == [len(d["action"]) for d in demos]
    for index, demo in enumerate(demos):
        episode = buffer.get_episode(index)
        np.testing.assert_array_equal(episode["state"], demo["state"])  # vectors stay exact
        decoded, truth = episode["image"].astype(np.float64), demo["image"].astype(np.float64)
        error = np.abs(decoded - truth).mean(axis=(1, 2, 3))  # per frame
        assert error.max() < 12.0, f"episode {index}: h264 error {error.max():.1f} per pixel"
        # Alignment: on the pixels that move, decoded frame i matches recorded frame i clearly better
        # than recorded frames i +- 1 or i +- 2 (a timestamp off by one frame would flip this).
        errors_by_shift = {shift: _moving_pixel_error(decoded, truth, shift) for shift in (-2, -1, 0, 1, 2)}
        best = min(errors_by_shift, key=errors_by_shift.__getitem__)
        assert best == 0, f"episode {index}: frames best match shift {best}: {errors_by_shift}"
        assert errors_by_shift[0] < 0.8 * min(errors_by_shift[-1], errors_by_shift[1]), errors_by_shift


def _moving_pixel_error(decoded: np.ndarray, truth: np.ndarray, shift: int, reach: int = 2) -> float:
    """Mean |decoded[i] - truth[i + shift]| over the pixels that change within +-reach frames of i."""
    errors = []
    for i in range(reach, len(truth) - reach):
        window = np.stack([np.abs(truth[i + k] - truth[i]).max(-1) for k in range(-reach, reach + 1)])
        moving = window.max(0) > 30  # (H, W)
        if moving.any():
            errors.append(np.abs(decoded[i] - truth[i + shift]).max(-1)[moving].mean())
    assert len(errors) > len(truth) // 2, "too few frames with motion to check alignment"
    return float(np.mean(errors))


def test_from_lerobot_errors(
    tmp_path: Path, lerobot_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nothing"
    assert (
        run(["from-lerobot", "--repo-id", "x/y", "--root", str(missing), "--out", str(tmp_path / "o.zarr")])
        == 1
    )
    assert "meta/info.json is missing" in capsys.readouterr().err
    args = [
        "from-lerobot",
        "--repo-id",
        REPO_ID,
        "--root",
        str(lerobot_images),
        "--out",
        str(tmp_path / "o.zarr"),
    ]
    assert run([*args, "--camera", "wrist"]) == 1
    assert "no camera 'wrist'; its cameras are ['observation.images.top']" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()  # nothing half-written


# ------------------------------------------------------------------------------------ zarr -> LeRobot


@pytest.fixture
def source_buffer(tmp_path: Path, demos: list[dict[str, np.ndarray]]) -> Path:
    path = tmp_path / "source.zarr"
    card = {"task": "reach_around", "camera": "top", "image_size": 64, "episode_seeds": [0, 1, 2]}
    buffer = ReplayBuffer.create(
        path, meta={"fps": 10.0, "source": "scd-collect", "task": "reach_around", "card": card}
    )
    for demo in demos:
        buffer.append_episode({key: value for key, value in demo.items() if key != "image_side"})
    return path


@pytest.mark.parametrize("video", [False, True], ids=["png", "video"])
def test_to_lerobot_loads_in_lerobot(
    source_buffer: Path, demos: list[dict[str, np.ndarray]], tmp_path: Path, video: bool
) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path / "exported"
    args = ["to-lerobot", "--zarr", str(source_buffer), "--repo-id", "local/exported", "--root", str(root)]
    assert run(args + (["--video"] if video else [])) == 0
    # LeRobot's own loader, with the windowed loading its trainers use.
    dataset = LeRobotDataset("local/exported", root=root, delta_timestamps={"action": [-0.1, 0.0, 0.1]})
    assert dataset.num_episodes == len(demos)
    assert dataset.num_frames == sum(len(d["action"]) for d in demos)
    assert dataset.fps == 10
    # The card's camera ("top") names the feature, as our envs name it under lerobot-eval.
    assert dataset.meta.features["observation.images.top"]["dtype"] == ("video" if video else "image")
    first = len(demos[0]["action"])
    item = dataset[first + 4]  # episode 1, step 4
    np.testing.assert_array_equal(item["observation.state"].numpy(), demos[1]["state"][4])
    np.testing.assert_array_equal(item["action"].numpy(), demos[1]["action"][3:6])
    assert item["action_is_pad"].tolist() == [False, False, False]
    assert item["task"] == "reach_around"
    assert dataset[first]["action_is_pad"].tolist() == [True, False, False]  # an episode start
    image = np.rint(item["observation.images.top"].permute(1, 2, 0).numpy() * 255).astype(np.int64)
    error = np.abs(image - demos[1]["image"][4]).mean()
    assert error == 0 if not video else error < 12.0
    # Our record travels inside the LeRobot folder and comes back on import.
    record = json.loads((root / CARD_FILE).read_text())
    assert record["meta"]["card"]["episode_seeds"] == [0, 1, 2]
    back = tmp_path / "back.zarr"
    assert run(["from-lerobot", "--repo-id", "local/exported", "--root", str(root), "--out", str(back)]) == 0
    meta = ReplayBuffer.open(back).meta
    assert meta["task"] == "reach_around" and meta["source"] == "scd-collect" and meta["fps"] == 10.0
    assert meta["card"]["episode_seeds"] == [0, 1, 2]
    assert meta["card"]["lerobot_import"]["repo_id"] == "local/exported"


def test_to_lerobot_refuses_to_clobber(
    source_buffer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "occupied"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    args = ["to-lerobot", "--zarr", str(source_buffer), "--repo-id", "local/x", "--root", str(root)]
    assert run(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert run([*args, "--overwrite"]) == 1
    assert "not a LeRobot dataset or an empty folder" in capsys.readouterr().err
    assert (root / "notes.txt").read_text() == "keep me"


def test_module_and_cli_work_without_lerobot(source_buffer: Path, tmp_path: Path) -> None:
    """The converter module imports with LeRobot absent; the CLI then explains how to install it."""
    code = (
        "import sys; sys.modules['lerobot'] = None\n"  # makes `import lerobot` fail like an absent package
        "import scd_policy.interop.lerobot_convert as m\n"
        "from scd_policy.interop.convert_cli import run\n"
        f"sys.exit(run(['to-lerobot', '--zarr', {str(source_buffer)!r}, '--repo-id', 'a/b', '--root', "
        f"{str(tmp_path / 'never')!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "pip install -e .[lerobot]" in result.stderr
    assert not (tmp_path / "never").exists()


def test_window_benchmark_reads_the_same_windows_both_ways(lerobot_video: Path, tmp_path: Path) -> None:
    from scd_policy.interop.window_benchmark import run as benchmark

    out = tmp_path / "bench.zarr"
    assert run(["from-lerobot", "--repo-id", REPO_ID, "--root", str(lerobot_video), "--out", str(out)]) == 0
    result = benchmark(
        ["--repo-id", REPO_ID, "--root", str(lerobot_video), "--zarr", str(out), "--samples", "4"]
    )
    assert set(result) == {"lerobot_ms_per_window", "zarr_ms_per_window", "ratio"}
    assert all(value > 0 for value in result.values())
    with pytest.raises(SystemExit, match="not the same data"):
        source = ReplayBuffer.open(out)
        short = tmp_path / "short.zarr"
        ReplayBuffer.create(short, meta={"fps": 10.0}).append_episode(source.get_episode(0))
        benchmark(
            ["--repo-id", REPO_ID, "--root", str(lerobot_video), "--zarr", str(short), "--samples", "2"]
        )


def test_single_camera_name_round_trips(demos: list[dict[str, np.ndarray]], tmp_path: Path) -> None:
    """LeRobot's camera-less name observation.image comes back as observation.image after a round trip."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot_helpers import write_lerobot_dataset

    root = write_lerobot_dataset(tmp_path / "plain", demos[:1], video=False, camera_key="observation.image")
    buffer_path = tmp_path / "plain.zarr"
    assert run(["from-lerobot", "--repo-id", "a/plain", "--root", str(root), "--out", str(buffer_path)]) == 0
    buffer = ReplayBuffer.open(buffer_path)
    assert buffer.meta["card"]["camera"] is None
    np.testing.assert_array_equal(buffer.get_episode(0)["image"], demos[0]["image"])
    again = tmp_path / "again"
    assert run(["to-lerobot", "--zarr", str(buffer_path), "--repo-id", "a/again", "--root", str(again)]) == 0
    features = LeRobotDataset("a/again", root=again).meta.features
    assert "observation.image" in features and not any(k.startswith("observation.images.") for k in features)


def test_two_camera_import_trains_and_rolls_out(demos: list[dict[str, np.ndarray]], tmp_path: Path) -> None:
    """A LeRobot dataset with two cameras imports as image_top / image_side, trains with each camera as its
    own token group, and rolls out with both rendered from the cameras the card names."""
    from lerobot_helpers import write_lerobot_dataset

    from scd_policy.evaluation import EvalRunConfig, run_evaluation
    from scd_policy.policies import load_policy
    from scd_policy.training.experiment import compose_experiment, run_training

    root = write_lerobot_dataset(
        tmp_path / "two", demos[:2], video=False, side_camera_key="observation.images.side"
    )
    out = tmp_path / "two.zarr"
    assert run(["from-lerobot", "--repo-id", "a/two", "--root", str(root), "--out", str(out)]) == 0
    buffer = ReplayBuffer.open(out)
    assert set(buffer.keys) == {"state", "image_top", "image_side", "action"}
    assert buffer.meta["card"]["cameras"] == {"image_side": "side", "image_top": "top"}
    for index in range(2):
        episode = buffer.get_episode(index)
        np.testing.assert_array_equal(episode["image_top"], demos[index]["image"])
        np.testing.assert_array_equal(episode["image_side"], demos[index]["image_side"])
    cfg = compose_experiment(
        [
            f"dataset={out}",
            f"out={tmp_path / 'run'}",
            "task=reach_around",
            "size=tiny",
            "data.obs_keys=[state,image_top,image_side]",
            "train.steps=2",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.val_every=2",
            "train.checkpoint_every=2",
        ]
    )
    policy = load_policy(run_training(cfg))
    assert len(policy.tokenizer.image_encoders) == 2  # type: ignore[union-attr,arg-type]
    results = run_evaluation(
        EvalRunConfig(
            checkpoint=str(tmp_path / "run"),
            episodes=1,
            seeds=[0],
            n_envs=1,
            max_steps=4,
            videos=0,
            out=str(tmp_path / "eval.json"),
        )
    )
    assert results["mean_episode_length"] == 4
