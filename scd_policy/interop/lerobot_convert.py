"""Convert between a LeRobotDataset (codebase v3.0, on local disk) and scd-policy's zarr replay buffer.

Key mapping (ours <-> LeRobot's)::

    state      <-> observation.state                (T, Ds) float32
    env_state  <-> observation.environment_state    (T, De) float32 (import only, when present)
    image      <-> observation.images.<camera>      (T, H, W, 3) uint8 here; an "image" (PNG) or
                   or observation.image              "video" (mp4) feature there, one camera per buffer
    action     <-> action                           (T, Da) float32

An export names the camera after the buffer card's ``camera`` (``observation.images.top`` for our
tasks' default camera), the name ``lerobot-eval --env.type=scd`` gives it too; a buffer whose card
names no camera exports ``observation.image``. The frame rate travels both ways (LeRobot stores it
as an integer), and so does the dataset card: an export writes our record (fps, source, task, card)
to ``meta/scd_policy.json`` inside the LeRobot folder, a file LeRobot ignores, and an import of that
folder restores it. A plain LeRobot dataset gets a card naming its repo id, robot type, features,
camera and per-episode task strings.

LeRobot is an optional dependency (``pip install -e .[lerobot]``): it is imported inside the two
conversion functions only, so this module, its planning helpers and ``scd-convert --help`` work
without it. Both directions read and write local folders only and never contact the Hugging Face Hub.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scd_policy.conventions import is_image_shape
from scd_policy.data.replay_buffer import ReplayBuffer
from scd_policy.io import atomic_directory, atomic_write_text

log = logging.getLogger(__name__)

LEROBOT_STATE = "observation.state"
LEROBOT_ENV_STATE = "observation.environment_state"
LEROBOT_IMAGE = "observation.image"
LEROBOT_IMAGES_PREFIX = "observation.images."
LEROBOT_ACTION = "action"
# Columns LeRobot adds to every dataset itself; they are bookkeeping, not data to convert.
LEROBOT_BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
SUPPORTED_CODEBASE = "v3."
CARD_FILE = Path("meta") / "scd_policy.json"
CARD_FORMAT = "scd-policy/lerobot-export"


class ConversionError(ValueError):
    """The source dataset lacks what a conversion needs, or the destination cannot be written."""


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did: where from and to, how much, and which keys went where."""

    source: str
    destination: str
    episodes: int
    frames: int
    fps: float
    keys: dict[str, str]  # destination key -> source key
    skipped: list[str] = field(default_factory=list)  # source keys that were not converted

    def summary(self) -> str:
        mapping = ", ".join(f"{src} -> {dst}" for dst, src in self.keys.items())
        text = (
            f"{self.source} -> {self.destination}: {self.episodes} episodes, {self.frames} frames at "
            f"{self.fps:g} fps ({mapping})"
        )
        return text + (f"; not converted: {', '.join(self.skipped)}" if self.skipped else "")


# ---------------------------------------------------------------------------------------------- import


@dataclass(frozen=True)
class ImportPlan:
    """Which LeRobot feature becomes which buffer key (ours -> LeRobot's), decided from info.json alone."""

    keys: dict[str, str]
    images: dict[str, str]  # our image keys -> their camera names (``image`` for a single camera)
    videos: list[str]  # those of our image keys stored as video there
    skipped: list[str]


def camera_keys(features: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The LeRobot features holding camera frames (dtype "image" or "video"), sorted."""
    return sorted(key for key, ft in features.items() if ft.get("dtype") in ("image", "video"))


def _camera_name(key: str) -> str:
    """A LeRobot camera feature's name: the part after ``observation.images.`` (``image`` for LeRobot's
    single-camera ``observation.image``), dots made underscores so that it is a plain key."""
    return key.removeprefix(LEROBOT_IMAGES_PREFIX).replace(".", "_") if key != LEROBOT_IMAGE else "image"


def _camera_matches(key: str, camera: str) -> bool:
    return camera in (key, key.removeprefix(LEROBOT_IMAGES_PREFIX))


def _vector_feature(features: Mapping[str, Mapping[str, Any]], key: str) -> None:
    ft = features[key]
    shape = tuple(ft.get("shape", ()))
    dtype = str(ft.get("dtype", ""))
    if len(shape) != 1 or not dtype.startswith(("float", "int")):
        raise ConversionError(
            f"LeRobot feature {key!r} has dtype {dtype!r} and shape {list(shape)}; expected a numeric "
            "vector (float32, shape [D])"
        )


def _check_camera(key: str, ft: Mapping[str, Any]) -> None:
    """A camera feature must hold RGB frames; info.json writes its shape (H, W, C) or, rarely, (C, H, W)."""
    shape = tuple(ft.get("shape", ()))
    names = list(ft.get("names") or [])
    if len(shape) != 3:
        raise ConversionError(f"LeRobot camera {key!r} has shape {list(shape)}; expected (H, W, 3)")
    if names and names[0] in ("channel", "channels", "c"):
        layout = "chw"
    elif names and names[-1] in ("channel", "channels", "c"):
        layout = "hwc"
    else:
        layout = "chw" if shape[0] == 3 and shape[-1] != 3 else "hwc"
    channels = shape[0] if layout == "chw" else shape[-1]
    if channels != 3:
        raise ConversionError(
            f"LeRobot camera {key!r} has {channels} channels (shape {list(shape)}); expected 3"
        )


def plan_import(
    features: Mapping[str, Mapping[str, Any]], camera: str | None = None, images: bool = True
) -> ImportPlan:
    """Decide the key mapping for an import from LeRobot's feature table (``meta/info.json``).

    ``camera`` picks the one camera that becomes ``image`` (its full key or the part after
    ``observation.images.``); a single camera becomes ``image`` too. Without ``camera``, several cameras
    become one key each, ``image_<camera>`` (``observation.images.wrist`` -> ``image_wrist``), and the
    card maps each key to its camera. ``images=False`` drops every camera (a state-only buffer).
    """
    available = sorted(features)
    if LEROBOT_ACTION not in features:
        raise ConversionError(f"the LeRobot dataset has no {LEROBOT_ACTION!r} feature; it has {available}")
    _vector_feature(features, LEROBOT_ACTION)
    keys = {"action": LEROBOT_ACTION}
    for ours, theirs in (("state", LEROBOT_STATE), ("env_state", LEROBOT_ENV_STATE)):
        if theirs in features:
            _vector_feature(features, theirs)
            keys[ours] = theirs

    cameras = camera_keys(features)
    chosen: dict[str, str] = {}  # our key -> their camera feature
    if camera is not None and not images:
        raise ConversionError("a camera was chosen but images are disabled; drop one of the two options")
    if camera is not None:
        matches = [key for key in cameras if _camera_matches(key, camera)]
        if not matches:
            raise ConversionError(f"the LeRobot dataset has no camera {camera!r}; its cameras are {cameras}")
        chosen = {"image": matches[0]}
    elif images and len(cameras) == 1:
        chosen = {"image": cameras[0]}
    elif images:
        chosen = {f"image_{_camera_name(key)}": key for key in cameras}
        if len(chosen) != len(cameras):
            raise ConversionError(
                f"the LeRobot cameras {cameras} do not have distinct names; pick one with camera="
            )
    for ours, theirs in chosen.items():
        _check_camera(theirs, features[theirs])
        keys[ours] = theirs
    if not set(keys) - {"action"}:
        raise ConversionError(
            f"the LeRobot dataset has no observation to convert (looked for {LEROBOT_STATE!r}, "
            f"{LEROBOT_ENV_STATE!r} and cameras {LEROBOT_IMAGE!r} / '{LEROBOT_IMAGES_PREFIX}<camera>'); "
            f"it has {available}"
        )
    used = set(keys.values()) | set(LEROBOT_BOOKKEEPING)
    return ImportPlan(
        keys=keys,
        images={ours: _camera_name(theirs) for ours, theirs in chosen.items()},
        videos=[ours for ours, theirs in chosen.items() if features[theirs].get("dtype") == "video"],
        skipped=[key for key in available if key not in used],
    )


def read_info(root: Path) -> dict[str, Any]:
    """``meta/info.json`` of a local LeRobot dataset, checked for a supported codebase version."""
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise ConversionError(
            f"no LeRobot dataset at {root}: {path} is missing (root must be the dataset folder itself, "
            "the one holding meta/, data/ and possibly videos/)"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(info, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    version = str(info.get("codebase_version", ""))
    if not version.startswith(SUPPORTED_CODEBASE):
        raise ConversionError(
            f"{root} is a LeRobot dataset of codebase_version {version!r}; this converter reads v3.x "
            "(convert older datasets first with lerobot's lerobot.datasets.v30.convert_dataset_v21_to_v30)"
        )
    if not isinstance(info.get("features"), dict) or "fps" not in info:
        raise ConversionError(f"{path} lacks its 'features' table or 'fps'")
    return info


def _to_hwc_uint8(frames: np.ndarray, layout: str) -> np.ndarray:
    """Camera frames (T, H, W, 3) or (T, 3, H, W), uint8 or float in [0, 1] -> uint8 (T, H, W, 3)."""
    if layout == "chw":
        frames = np.moveaxis(frames, 1, -1)  # (T, 3, H, W) -> (T, H, W, 3)
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    # LeRobot hands out floats v / 255; rounding back recovers the stored bytes exactly.
    return np.ascontiguousarray(
        np.clip(np.rint(np.asarray(frames, np.float32) * 255.0), 0, 255).astype(np.uint8)
    )


def _stack_column(values: Any, key: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object:  # a column of per-row arrays
        array = np.stack([np.asarray(v) for v in values])
    if array.ndim == 0:
        raise ConversionError(f"LeRobot column {key!r} could not be read as an array")
    return array


def lerobot_to_zarr(
    repo_id: str,
    root: str | Path,
    out: str | Path,
    *,
    camera: str | None = None,
    images: bool = True,
    overwrite: bool = False,
    video_backend: str | None = None,
) -> ConversionReport:
    """Write the LeRobotDataset at ``root`` as a replay buffer at ``out`` (all episodes, in order).

    The buffer is built in a temporary folder next to ``out`` and moved into place when complete.
    """
    root, out = Path(root), Path(out)
    info = read_info(root)
    plan = plan_import(info["features"], camera=camera, images=images)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and not ((out / "zarr.json").is_file() or (out / ".zgroup").is_file()):
        raise ConversionError(f"{out} exists and is not a zarr group; refusing to overwrite it")

    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # optional dependency
    from lerobot.datasets.video_utils import decode_video_frames

    dataset = LeRobotDataset(repo_id, root=root, video_backend=video_backend)
    table = dataset.hf_dataset.with_format("numpy")  # plain arrays; images decode to uint8 HWC
    episode_of_row = np.asarray(table["episode_index"], dtype=np.int64)
    frame_of_row = np.asarray(table["frame_index"], dtype=np.int64)
    timestamp_of_row = np.asarray(table["timestamp"], dtype=np.float64)
    stored_card = _read_export_card(root)
    fps = float(info["fps"])
    episode_tasks: list[list[str]] = []
    frames = 0
    with atomic_directory(out) as tmp:
        buffer = ReplayBuffer.create(
            tmp, meta=_import_meta(repo_id, root, info, plan, stored_card), overwrite=True
        )
        for episode in range(dataset.meta.total_episodes):
            rows = np.flatnonzero(episode_of_row == episode)
            if rows.size == 0:
                raise ConversionError(f"episode {episode} of {root} has no frames in data/")
            rows = rows[np.argsort(frame_of_row[rows], kind="stable")]
            if not np.array_equal(frame_of_row[rows], np.arange(rows.size)):
                raise ConversionError(
                    f"episode {episode} of {root} has missing or repeated frame_index values"
                )
            part = table.select(rows.tolist())
            arrays: dict[str, np.ndarray] = {}
            for ours, theirs in plan.keys.items():
                if ours in plan.videos:
                    arrays[ours] = _decode_episode_video(
                        dataset, decode_video_frames, episode, theirs, timestamp_of_row[rows]
                    )
                elif ours in plan.images:  # PNG frames decode to (T, H, W, 3) uint8
                    arrays[ours] = _to_hwc_uint8(_stack_column(part[theirs], theirs), "hwc")
                else:
                    arrays[ours] = _stack_column(part[theirs], theirs).astype(np.float32)
            buffer.append_episode(arrays)
            frames += int(rows.size)
            episode_tasks.append([str(task) for task in dataset.meta.episodes[episode].get("tasks") or []])
        if stored_card is None:
            meta = buffer.meta
            card = dict(meta.get("card") or {})
            card["lerobot"] = {**card.get("lerobot", {}), "episode_tasks": episode_tasks}
            buffer.update_meta(card=card)
    report = ConversionReport(
        source=f"{repo_id} ({root})",
        destination=str(out),
        episodes=len(episode_tasks),
        frames=frames,
        fps=fps,
        keys=dict(plan.keys),
        skipped=list(plan.skipped),
    )
    log.info("%s", report.summary())
    return report


def _decode_episode_video(
    dataset: Any, decode: Any, episode: int, key: str, timestamps: np.ndarray
) -> np.ndarray:
    """Every frame of one episode of a video feature, uint8 (T, H, W, 3), in one decoder call."""
    record = dataset.meta.episodes[episode]
    start = float(record[f"videos/{key}/from_timestamp"])
    path = dataset.root / dataset.meta.get_video_file_path(episode, key)
    # decode returns float32 (T, 3, H, W) in [0, 1] at the frames nearest these times (within tolerance).
    frames = decode(path, [start + float(t) for t in timestamps], dataset.tolerance_s, dataset.video_backend)
    return _to_hwc_uint8(frames.numpy(), "chw")


def _read_export_card(root: Path) -> dict[str, Any] | None:
    """Our record stored by :func:`zarr_to_lerobot` in this LeRobot folder, if it was made by an export."""
    path = root / CARD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error
    if (
        not isinstance(record, dict)
        or record.get("format") != CARD_FORMAT
        or not isinstance(record.get("meta"), dict)
    ):
        raise ConversionError(f"{path} is not an {CARD_FORMAT!r} record")
    meta: dict[str, Any] = record["meta"]
    return meta


def _import_meta(
    repo_id: str, root: Path, info: Mapping[str, Any], plan: ImportPlan, stored: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The buffer's meta: the exported record restored, or a fresh card describing the LeRobot source."""
    lerobot = {
        "repo_id": repo_id,
        "root": str(root),
        "codebase_version": info.get("codebase_version"),
        "robot_type": info.get("robot_type"),
        "fps": info["fps"],
        "total_episodes": info.get("total_episodes"),
        "total_frames": info.get("total_frames"),
        "features": {
            key: {"dtype": ft.get("dtype"), "shape": list(ft.get("shape", ()))}
            for key, ft in info["features"].items()
            if key not in LEROBOT_BOOKKEEPING
        },
        "keys": dict(plan.keys),
    }
    if stored is not None:
        meta = {key: value for key, value in stored.items() if key not in ("keys", "shapes", "dtypes")}
        meta.pop("format", None)
        meta.pop("format_version", None)
        card = dict(meta.get("card") or {})
        card["lerobot_import"] = lerobot
        meta["card"] = card
        meta["fps"] = float(info["fps"])
        return meta
    image_key = plan.keys.get("image")
    return {
        "fps": float(info["fps"]),
        "source": "lerobot",
        "task": None,
        "card": {
            "image": image_key is not None,
            # observation.images.<camera> names a camera; LeRobot's single-camera observation.image does not.
            "camera": image_key.removeprefix(LEROBOT_IMAGES_PREFIX)
            if image_key and image_key.startswith(LEROBOT_IMAGES_PREFIX)
            else None,
            # Several cameras: image_<camera> -> camera, what rollouts render each key from.
            "cameras": {ours: name for ours, name in plan.images.items() if ours != "image"},
            "lerobot": lerobot,
        },
    }


# ---------------------------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportPlan:
    """LeRobot's feature table for an export and where each feature comes from (LeRobot's -> ours)."""

    features: dict[str, dict[str, Any]]
    keys: dict[str, str]
    skipped: list[str]


def plan_export(
    shapes: Mapping[str, Sequence[int]],
    dtypes: Mapping[str, np.dtype[Any]],
    *,
    video: bool = False,
    camera: str | None = None,
    state_key: str = "state",
    image_key: str = "image",
    action_key: str = "action",
) -> ExportPlan:
    """LeRobot features for a buffer with these per-step ``shapes``/``dtypes``; images as PNG or video.

    The image becomes ``observation.images.<camera>``, or ``observation.image`` when ``camera`` is None.
    """
    available = sorted(shapes)
    if action_key not in shapes:
        raise ConversionError(f"the buffer has no action key {action_key!r}; it has {available}")
    features: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}

    def vector(ours: str, theirs: str) -> None:
        shape = tuple(int(d) for d in shapes[ours])
        if len(shape) != 1 or np.dtype(dtypes[ours]).kind not in "fiu":
            raise ConversionError(
                f"buffer key {ours!r} has shape {list(shape)} and dtype {np.dtype(dtypes[ours])}; "
                f"{theirs!r} must be a numeric vector (D,)"
            )
        features[theirs] = {
            "dtype": "float32",
            "shape": shape,
            "names": [f"{ours}_{i}" for i in range(shape[0])],
        }
        keys[theirs] = ours

    if camera is not None and (not camera or "/" in camera or "." in camera):
        raise ConversionError(f"camera name {camera!r} must be non-empty, without '/' or '.'")
    camera_key = f"{LEROBOT_IMAGES_PREFIX}{camera}" if camera else LEROBOT_IMAGE
    if state_key in shapes:
        vector(state_key, LEROBOT_STATE)
    if image_key in shapes:
        shape = tuple(int(d) for d in shapes[image_key])
        if not is_image_shape(shape) or shape[-1] != 3 or np.dtype(dtypes[image_key]) != np.uint8:
            raise ConversionError(
                f"buffer key {image_key!r} has shape {list(shape)} and dtype {np.dtype(dtypes[image_key])}; "
                f"{camera_key!r} needs uint8 RGB frames (H, W, 3)"
            )
        features[camera_key] = {
            "dtype": "video" if video else "image",
            "shape": shape,
            "names": ["height", "width", "channels"],
        }
        keys[camera_key] = image_key
    if not keys:
        raise ConversionError(
            f"the buffer has no observation to export: neither {state_key!r} nor {image_key!r} is among "
            f"its keys {available}"
        )
    if video and camera_key not in features:
        raise ConversionError(f"video export asked for, but the buffer has no image key {image_key!r}")
    vector(action_key, LEROBOT_ACTION)
    return ExportPlan(features=features, keys=keys, skipped=[k for k in available if k not in keys.values()])


def lerobot_fps(fps: Any) -> int:
    """LeRobot stores fps as an integer: accept only a whole positive number."""
    if fps is None:
        raise ConversionError("the buffer's meta has no fps; pass fps= (--fps) for the LeRobot dataset")
    value = float(fps)
    if not math.isfinite(value) or value <= 0 or abs(value - round(value)) > 1e-9:
        raise ConversionError(f"fps={fps!r}: LeRobot datasets need a whole, positive frame rate")
    return round(value)


def zarr_to_lerobot(
    zarr_path: str | Path,
    repo_id: str,
    root: str | Path,
    *,
    video: bool = False,
    vcodec: str = "h264",
    camera: str | None = None,
    task: str | None = None,
    fps: float | None = None,
    robot_type: str | None = None,
    overwrite: bool = False,
    state_key: str = "state",
    image_key: str = "image",
    action_key: str = "action",
) -> ConversionReport:
    """Write the replay buffer at ``zarr_path`` as a LeRobotDataset (codebase v3.0) in folder ``root``.

    ``camera`` names the LeRobot camera feature ``observation.images.<camera>`` (default: the card's
    ``camera``; ``observation.image`` when neither names one). ``task`` is the language instruction
    LeRobot stores with every frame (default: the buffer's task name, else "unspecified task");
    ``video`` stores the camera as an mp4 per chunk (``vcodec``) instead
    of PNG frames. The dataset is written to a temporary folder and moved to ``root`` when complete.
    """
    zarr_path, root = Path(zarr_path), Path(root)
    buffer = ReplayBuffer.open(zarr_path, mode="r")
    if buffer.n_episodes == 0:
        raise ConversionError(f"{zarr_path} holds no episodes; nothing to export")
    meta = buffer.meta
    rate = lerobot_fps(fps if fps is not None else meta.get("fps"))
    stored_card = meta.get("card")
    card: dict[str, Any] = stored_card if isinstance(stored_card, dict) else {}
    instruction = task or meta.get("task") or card.get("task") or "unspecified task"
    plan = plan_export(
        buffer.shapes,
        buffer.dtypes,
        video=video,
        camera=camera if camera is not None else card.get("camera"),
        state_key=state_key,
        image_key=image_key,
        action_key=action_key,
    )
    if root.exists():
        if not overwrite:
            raise ConversionError(f"{root} already exists; pass overwrite=True (--overwrite) to replace it")
        if not ((root / "meta" / "info.json").is_file() or (root.is_dir() and not any(root.iterdir()))):
            raise ConversionError(
                f"{root} exists and is not a LeRobot dataset or an empty folder; not replacing it"
            )

    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # optional dependency

    frames = 0
    with atomic_directory(root) as tmp:
        tmp.rmdir()  # LeRobot insists on creating the dataset folder itself
        dataset = LeRobotDataset.create(
            repo_id,
            fps=rate,
            features=plan.features,
            root=tmp,
            robot_type=robot_type or card.get("robot_type"),
            use_videos=video,
            vcodec=vcodec,
        )
        try:
            for episode in range(buffer.n_episodes):
                arrays = buffer.get_episode(episode)
                length = int(arrays[action_key].shape[0])
                for step in range(length):
                    frame: dict[str, Any] = {"task": str(instruction)}
                    for theirs, ours in plan.keys.items():
                        value = arrays[ours][step]
                        frame[theirs] = value if ours == image_key else value.astype(np.float32)
                    dataset.add_frame(frame)
                dataset.save_episode()
                frames += length
        finally:
            dataset.finalize()
        record = {
            "format": CARD_FORMAT,
            "source": str(zarr_path),
            "keys": dict(plan.keys),
            "meta": {key: meta[key] for key in meta if key not in ("keys", "shapes", "dtypes")},
        }
        atomic_write_text(tmp / CARD_FILE, json.dumps(record, indent=2) + "\n")
    report = ConversionReport(
        source=str(zarr_path),
        destination=f"{repo_id} ({root})",
        episodes=buffer.n_episodes,
        frames=frames,
        fps=float(rate),
        keys=dict(plan.keys),
        skipped=list(plan.skipped),
    )
    log.info("%s", report.summary())
    return report
