"""Tests of the LeRobot interop; they need LeRobot, which lives in .venv-lerobot only.

Collection: in an environment without LeRobot (the main .venv) this folder is not collected at all,
so the main test run reports no skips; ``scripts/test.sh`` then runs it in .venv-lerobot as a second
pytest invocation with ``SCD_REQUIRE_LEROBOT=1``, under which a missing LeRobot is an error, never a
silent skip.

Fixtures build real data: demonstrations of our ``reach_around`` task from its scripted expert
(64x64 camera images), written into LeRobotDatasets with LeRobot's own recording API (PNG images and
h264 video), all offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from lerobot_helpers import collect_demos, write_lerobot_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
# LeRobot's loader (Hugging Face `datasets`) caches Arrow files for every dataset it opens; keep the
# test datasets' caches out of ~/.cache and delete them at exit. Set before anything imports `datasets`.
if "HF_DATASETS_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="scd-lerobot-tests-hf-")
    os.environ["HF_DATASETS_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

HAVE_LEROBOT = importlib.util.find_spec("lerobot") is not None
if not HAVE_LEROBOT and os.environ.get("SCD_REQUIRE_LEROBOT") == "1":
    raise RuntimeError(
        "SCD_REQUIRE_LEROBOT=1 but lerobot is not importable: run these tests with .venv-lerobot/bin/python "
        "(bash scripts/setup_lerobot.sh creates it)"
    )
# Without LeRobot nothing here is collected (not skipped): scripts/test.sh runs it in .venv-lerobot.
collect_ignore_glob = [] if HAVE_LEROBOT else ["test_*.py"]


@pytest.fixture(scope="session")
def demos() -> list[dict[str, np.ndarray]]:
    episodes = collect_demos()
    # The data must be real: frames vary within an episode and the expert moves.
    assert all(len(e["action"]) > 10 for e in episodes)
    assert all(np.abs(np.diff(e["image"].astype(int), axis=0)).sum() > 0 for e in episodes)
    return episodes


@pytest.fixture(scope="session")
def lerobot_images(tmp_path_factory: pytest.TempPathFactory, demos: list[dict[str, np.ndarray]]) -> Path:
    """A LeRobotDataset of the demos with PNG image frames (lossless)."""
    return write_lerobot_dataset(tmp_path_factory.mktemp("lerobot") / "images", demos, video=False)


@pytest.fixture(scope="session")
def lerobot_video(tmp_path_factory: pytest.TempPathFactory, demos: list[dict[str, np.ndarray]]) -> Path:
    """A LeRobotDataset of the demos with the camera stored as h264 video (lossy)."""
    return write_lerobot_dataset(tmp_path_factory.mktemp("lerobot") / "video", demos, video=True)
