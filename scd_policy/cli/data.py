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
import warnings
from collections.abc import Sequence

from tqdm import tqdm

from scd_policy.data.replay_buffer import DatasetError, ReplayBuffer

PROG = "scd-data"


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


def _say(kind: str, text: str) -> None:
    print(f"{PROG} check: {kind}: {text}", file=sys.stderr)


def check(path: str, *, strict: bool = False, progress: bool = True) -> int:
    """Verify the buffer at ``path``, print what is wrong; returns the process exit code."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # Chunk files are checked by verify below, which lists every damaged one instead of
            # stopping at the first as opening would.
            buffer = ReplayBuffer.open(path, mode="r", check_chunks=False)
        except DatasetError as error:
            _say("error", str(error))
            return 1
    for warning in caught:  # e.g. residue of an interrupted append: worth saying, not damage
        _say("warning", str(warning.message))

    total = buffer.chunk_count()
    # disable=None: tqdm shows the bar only on a terminal, so logs and pipes stay clean.
    with tqdm(
        total=total, unit="chunk", desc=f"checking {buffer.path.name}", disable=None if progress else True
    ) as bar:
        problems = buffer.verify(progress=bar.update)

    damage = [problem for problem in problems if problem.fatal or strict]
    for problem in problems:
        _say("error" if problem in damage else "warning", f"{buffer.path}: {problem.describe()}")
    arrays = len(buffer.keys) + 1  # the data arrays and meta/episode_ends
    checks = "CRC-32C checksums verified" if buffer.checksummed else "no checksums in this older format"
    size = f"{buffer.n_episodes} episodes, {buffer.n_steps} steps, {arrays} arrays"
    summary = f"{size}, {total} chunks read; {checks}"
    if damage:
        _say(
            "error",
            f"{buffer.path} is damaged: {len(damage)} bad chunk file(s) ({summary}). Fix: re-collect the "
            "dataset (or restore it from a backup); reading it raises DatasetError",
        )
        return 1
    print(f"{buffer.path}: intact ({summary})")
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return check(args.path, strict=args.strict, progress=not args.no_progress)
    except KeyboardInterrupt:
        _say("error", "interrupted")
        return 130


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
