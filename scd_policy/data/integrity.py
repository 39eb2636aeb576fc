"""Checking a replay buffer on disk for damage, with a report a person reads (behind ``scd-data check``).

``check_dataset`` opens the buffer without stopping at the first damaged chunk, reads and decodes every
chunk (``ReplayBuffer.verify``; checksums for format-2 buffers) and prints one line per damaged chunk
file on stderr and a summary; it returns the exit status (0 intact, 1 damaged or unreadable).
"""

from __future__ import annotations

import sys
import warnings

from tqdm import tqdm

from scd_policy.data.replay_buffer import DatasetError, ReplayBuffer

PROG = "scd-data"


def say(kind: str, text: str) -> None:
    print(f"{PROG} check: {kind}: {text}", file=sys.stderr)


def check_dataset(path: str, *, strict: bool = False, progress: bool = True) -> int:
    """Verify the buffer at ``path``, print what is wrong; returns the process exit code."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # Chunk files are checked by verify below, which lists every damaged one instead of
            # stopping at the first as opening would.
            buffer = ReplayBuffer.open(path, mode="r", check_chunks=False)
        except DatasetError as error:
            say("error", str(error))
            return 1
    for warning in caught:  # e.g. residue of an interrupted append: worth saying, not damage
        say("warning", str(warning.message))

    total = buffer.chunk_count()
    # disable=None: tqdm shows the bar only on a terminal, so logs and pipes stay clean.
    with tqdm(
        total=total, unit="chunk", desc=f"checking {buffer.path.name}", disable=None if progress else True
    ) as bar:
        problems = buffer.verify(progress=bar.update)

    damage = [problem for problem in problems if problem.fatal or strict]
    for problem in problems:
        say("error" if problem in damage else "warning", f"{buffer.path}: {problem.describe()}")
    arrays = len(buffer.keys) + 1  # the data arrays and meta/episode_ends
    checks = "CRC-32C checksums verified" if buffer.checksummed else "no checksums in this older format"
    size = f"{buffer.n_episodes} episodes, {buffer.n_steps} steps, {arrays} arrays"
    summary = f"{size}, {total} chunks read; {checks}"
    if damage:
        say(
            "error",
            f"{buffer.path} is damaged: {len(damage)} bad chunk file(s) ({summary}). Fix: re-collect the "
            "dataset (or restore it from a backup); reading it raises DatasetError",
        )
        return 1
    print(f"{buffer.path}: intact ({summary})")
    return 0
