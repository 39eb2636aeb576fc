"""``scd-data``: look after replay buffers on disk.

    scd-data check PATH [--strict] [--no-progress]

``check`` reads and decodes every chunk of the buffer (``ReplayBuffer.verify``), checksums included
for buffers written by this version, and prints one line per damaged chunk file. Exit status: 0 when
the buffer is intact, 1 when it is damaged or cannot be opened, 2 for a usage error.

A plain argparse program rather than a Hydra app like scd-train: it takes one path and no
configuration tree, and Hydra would add an outputs/ folder and its own logging for nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scd_policy.data.integrity import PROG, check_dataset, say


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Check scd-policy replay buffers (zarr directories) for damage."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="read every chunk of a replay buffer and list the damaged ones",
        description=(
            "Open the replay buffer at PATH and read every chunk of meta/episode_ends and data/<key> over "
            "the committed steps. Reports missing chunk files, checksum mismatches (format version 2 "
            "buffers) and truncated or undecodable chunks, one line each. Exit 0 when intact, 1 otherwise."
        ),
    )
    check.add_argument("path", metavar="PATH", help="the replay buffer directory (e.g. datasets/push_t.zarr)")
    check.add_argument(
        "--strict",
        action="store_true",
        help=(
            "count absent chunks of older buffers (scd version 1, zarr format 2) as damage; by default they "
            "are warnings, since those formats leave all-zero chunks unwritten"
        ),
    )
    check.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)"
    )
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return check_dataset(args.path, strict=args.strict, progress=not args.no_progress)
    except KeyboardInterrupt:
        say("error", "interrupted")
        return 130


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
