"""``scd-convert``: move datasets between LeRobot (v3.0, local folders) and scd-policy's zarr buffers.

    scd-convert from-lerobot --repo-id user/name --root DIR --out path.zarr [--camera CAM] [--no-images]
    scd-convert to-lerobot --zarr path.zarr --repo-id user/name --root DIR [--video] [--camera CAM]
                           [--task TEXT]

Both directions need the optional LeRobot install (``pip install -e .[lerobot]``, or
``scripts/setup_lerobot.sh`` on the reference machine). Only local folders are read and written: the
Hugging Face Hub is switched to offline mode before LeRobot is imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from scd_policy.data.replay_buffer import DatasetError
from scd_policy.interop.lerobot_convert import ConversionError, lerobot_to_zarr, zarr_to_lerobot

INSTALL_HINT = (
    "LeRobot is not installed in this environment: install the optional extra with "
    "`pip install -e .[lerobot]` (on the reference machine: `bash scripts/setup_lerobot.sh`, then run "
    "`.venv-lerobot/bin/scd-convert`); see docs/lerobot.md"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scd-convert",
        description="Convert datasets between LeRobot (codebase v3.0) and scd-policy zarr replay buffers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    source = commands.add_parser("from-lerobot", help="a local LeRobotDataset -> a zarr replay buffer")
    source.add_argument("--repo-id", required=True, help="the dataset's repo id, e.g. user/pusht")
    source.add_argument("--root", required=True, help="the dataset folder (holds meta/info.json)")
    source.add_argument("--out", required=True, help="the replay buffer to write (a .zarr folder)")
    source.add_argument("--camera", default=None, help="the camera that becomes 'image' (when several)")
    source.add_argument("--no-images", action="store_true", help="leave cameras out (a state-only buffer)")
    source.add_argument("--video-backend", default=None, help="LeRobot video decoder (torchcodec, pyav)")
    source.add_argument("--overwrite", action="store_true", help="replace an existing --out buffer")

    target = commands.add_parser("to-lerobot", help="a zarr replay buffer -> a local LeRobotDataset")
    target.add_argument("--zarr", required=True, help="the replay buffer to read (a .zarr folder)")
    target.add_argument("--repo-id", required=True, help="the repo id to give the dataset, e.g. user/name")
    target.add_argument("--root", required=True, help="the dataset folder to create")
    target.add_argument("--video", action="store_true", help="store the camera as mp4 video, not PNG frames")
    target.add_argument("--vcodec", default="h264", help="video codec with --video (h264, libsvtav1, ...)")
    target.add_argument(
        "--camera", default=None, help="camera name: observation.images.<camera> (default: the card's camera)"
    )
    target.add_argument("--task", default=None, help="language instruction stored with every frame")
    target.add_argument("--fps", type=float, default=None, help="frame rate, when the buffer's meta lacks it")
    target.add_argument("--overwrite", action="store_true", help="replace an existing LeRobot dataset")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, convert, print a one-line summary; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("lerobot") is None:
        print(f"scd-convert: {INSTALL_HINT}", file=sys.stderr)
        return 2
    # Conversions touch local folders only; never let LeRobot reach for the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "from-lerobot":
            report = lerobot_to_zarr(
                args.repo_id,
                args.root,
                args.out,
                camera=args.camera,
                images=not args.no_images,
                overwrite=args.overwrite,
                video_backend=args.video_backend,
            )
        else:
            report = zarr_to_lerobot(
                args.zarr,
                args.repo_id,
                args.root,
                video=args.video,
                vcodec=args.vcodec,
                camera=args.camera,
                task=args.task,
                fps=args.fps,
                overwrite=args.overwrite,
            )
    except (ConversionError, DatasetError) as error:
        print(f"scd-convert {args.command}: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run())


if __name__ == "__main__":
    main()
