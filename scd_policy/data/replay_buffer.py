"""An episode replay buffer stored as a zarr directory, laid out like Diffusion Policy's.

Layout (zarr format 3 when we write; format 2 buffers from Diffusion Policy open read-only)::

    <path>/
        data/<key>          time-major arrays, (n_steps, *per_step_shape), one per data key
        meta/episode_ends   int64 (n_episodes,), cumulative end index of every episode
        (group attributes)  {"meta": {...}}: fps, source, a free-form dataset card, keys/shapes/dtypes

Only ``meta/episode_ends`` says what is committed. An append writes the data arrays first and
``episode_ends`` last, and the final step of that commit is one atomic file replace (the array's
``zarr.json``), so a crash anywhere inside an append leaves every earlier episode readable. Rows
past ``episode_ends[-1]`` are the residue of such a crash: readers ignore them and opening in
append mode cuts them off.

Integrity (format version 2): every chunk carries a CRC-32C checksum (zarr's ``crc32c`` codec after
blosc) and every chunk over the committed steps is written, even an all-zero one, so an absent chunk
file is always damage. Opening checks that every chunk file of ``meta/episode_ends`` and ``data/<key>``
exists and is not empty (one ``stat`` per chunk); ``verify`` reads and decodes every chunk (checksums
included); any read that fails names the array, the chunk file and the dataset (``DatasetError``).
Older buffers (scd version 1, zarr format 2 from Diffusion Policy) stay readable: they have no
checksums, and zarr may have skipped their all-zero chunks, so an absent chunk file there is only a
``DatasetWarning`` (it reads as 0), while an empty or truncated one (shorter than its blosc header
says; checked on open and before each read) or an undecodable one is still an error.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numcodecs
import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec
from zarr.core.array_spec import ArrayConfigParams
from zarr.core.metadata import ArrayV3Metadata

FORMAT_NAME = "scd-policy/replay-buffer"
# 1: blosc chunks, no checksums, all-zero chunks left unwritten (zarr 3's default write_empty_chunks).
# 2: a CRC-32C on every chunk and every chunk over the committed steps written (see the module docstring).
FORMAT_VERSION = 2
# Meta fields the buffer derives from the data itself; callers may not set them.
DERIVED_META_KEYS = ("format", "format_version", "keys", "shapes", "dtypes")

# Aim for compressed-chunk reads of about this many raw bytes: an image array then gets a few frames
# per chunk (96x96x3 uint8 -> 4 frames), so a random training window decompresses little it does not
# need, while low-dimensional arrays get long chunks (they are read whole anyway).
_TARGET_CHUNK_BYTES = 128 * 1024
_MAX_TIME_CHUNK = 8192


_T = TypeVar("_T")

# How many damaged chunks one error message lists before it says "and N more".
_LISTED_PROBLEMS = 10


class DatasetError(ValueError):
    """A replay buffer or an episode is missing, malformed or inconsistent."""


class DatasetWarning(UserWarning):
    """A replay buffer that reads, but may not hold what was recorded (e.g. absent chunks in old formats)."""


def _fix_hint(dataset: Path) -> str:
    return (
        f"re-collect the dataset (or restore it from a backup); `scd-data check {dataset}` lists all damage"
    )


@dataclass(frozen=True)
class ChunkProblem:
    """One damaged (or, in an old format, possibly lost) chunk file of a replay buffer."""

    array: str  # "data/<key>" or "meta/episode_ends"
    file: Path  # the chunk file on disk
    kind: str  # "missing", "absent", "checksum mismatch", "truncated" or "undecodable"
    detail: str = ""
    # False only for "absent" in old formats, where zarr skips writing all-zero chunks.
    fatal: bool = True

    def describe(self) -> str:
        """What is wrong, without the advice on fixing it."""
        what = {
            "missing": "is missing (deleted or never copied); its steps would read as zeros",
            "absent": (
                "is absent: this buffer's older format skipped writing all-zero chunks, so its steps read "
                "as 0; if they should not be zero, the file was lost"
            ),
            "checksum mismatch": (
                "fails its CRC-32C checksum: its bytes changed after it was written (bit rot, truncation "
                "or an incomplete copy)"
            ),
            "truncated": "is truncated (cut short, e.g. by an interrupted copy or a full disk)",
            "undecodable": "is undecodable: the decompressor rejects it",
        }.get(self.kind, self.kind)
        text = f"{self.array}: chunk file {self.file} {what}"
        return f"{text} ({self.detail})" if self.detail else text

    def message(self, dataset: Path) -> str:
        """A one-line report: the array, the file, the dataset, what is wrong and how to fix it."""
        return f"dataset {dataset}: {self.describe()}; fix: {_fix_hint(dataset)}"


def time_chunk_for(step_shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    """Steps per chunk along time for an array whose steps have this shape and dtype (a power of 2)."""
    step_bytes = max(1, math.prod(step_shape) * dtype.itemsize)
    steps = max(1, _TARGET_CHUNK_BYTES // step_bytes)
    return int(min(_MAX_TIME_CHUNK, 1 << (steps.bit_length() - 1)))


def _compressors(dtype: np.dtype[Any]) -> tuple[BloscCodec, Crc32cCodec]:
    # Byte shuffle helps multi-byte floats; for uint8 images it would be a no-op, so skip it.
    shuffle = BloscShuffle.noshuffle if dtype.itemsize == 1 else BloscShuffle.shuffle
    # The checksum comes last, over the compressed bytes: a damaged file is then caught before the
    # decompressor sees it, which otherwise either fails with an anonymous error or decodes garbage.
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle), Crc32cCodec()


# zarr skips writing chunks equal to the fill value by default; a checksummed buffer writes them all,
# so that an absent chunk file can only mean damage.
_WRITE_ALL_CHUNKS: ArrayConfigParams = {"write_empty_chunks": True}


def _check_json(values: Mapping[str, Any], what: str) -> None:
    try:
        json.dumps(dict(values), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{what} must be JSON-serialisable: {exc}") from exc


class ReplayBuffer:
    """Episodes of time-major arrays in a zarr directory; see the module docstring for the layout."""

    def __init__(self, path: Path, group: zarr.Group, read_only: bool, check_chunks: bool = True) -> None:
        # Use ReplayBuffer.create / ReplayBuffer.open; this only wires up an already-validated group.
        self.path = path
        self.read_only = read_only
        self._group = group
        self._arrays: dict[str, zarr.Array[Any]] = {}
        self._cache: dict[str, np.ndarray] = {}
        self._episode_ends = np.zeros(0, dtype=np.int64)
        self._checksummed = self._read_format_version() >= 2
        self._load_index(check_chunks)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls, path: str | Path, *, meta: dict[str, Any] | None = None, overwrite: bool = False
    ) -> ReplayBuffer:
        """Create an empty buffer at ``path`` (a new directory); ``meta`` holds e.g. fps, source, card."""
        path = Path(path)
        user_meta = dict(meta or {})
        derived = sorted(set(user_meta) & set(DERIVED_META_KEYS))
        if derived:
            raise DatasetError(f"meta keys {derived} are derived from the data by the buffer; leave them out")
        _check_json(user_meta, "replay buffer meta")
        if path.exists():
            if not overwrite:
                raise DatasetError(
                    f"{path} already exists; pass overwrite=True to replace it, or "
                    "ReplayBuffer.open(path, mode='a') to append to it"
                )
            is_group = (path / "zarr.json").is_file() or (path / ".zgroup").is_file()
            if not path.is_dir() or not (is_group or not any(path.iterdir())):
                # Deleting a whole tree is only safe for what is clearly an old buffer.
                raise DatasetError(
                    f"{path} exists and is not a zarr group or an empty folder; refusing to overwrite it"
                )
            shutil.rmtree(path)
        group = zarr.open_group(path, mode="w", zarr_format=3)
        group.require_group("data")
        meta_group = group.require_group("meta")
        # One chunk holds 64k episode ends; the commit step below relies on ends living in chunk files
        # that are written before the array's shape is grown.
        meta_group.create_array(
            "episode_ends",
            shape=(0,),
            chunks=(1 << 16,),
            dtype="int64",
            fill_value=0,
            compressors=_compressors(np.dtype(np.int64)),
            config=_WRITE_ALL_CHUNKS,
        )
        record: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fps": None,
            "source": None,
            "card": {},
            "keys": [],
            "shapes": {},
            "dtypes": {},
        }
        record.update(user_meta)
        group.attrs["meta"] = record
        return cls(path, group, read_only=False)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", *, check_chunks: bool = True) -> ReplayBuffer:
        """Open an existing buffer: ``mode="r"`` read-only, ``"a"`` to append episodes.

        Opening checks that every chunk file over the committed steps exists and is not empty
        (``DatasetError`` naming the files otherwise; only a ``DatasetWarning`` for an absent chunk of
        an older-format buffer). ``check_chunks=False`` skips that check for the data arrays (not for
        ``meta/episode_ends``, which opening reads): ``scd-data check`` uses it so that ``verify``
        can list all damage rather than stop at the first.
        """
        path = Path(path)
        if mode not in ("r", "a"):
            raise DatasetError(f"mode={mode!r}; expected 'r' (read-only) or 'a' (append)")
        if not path.exists():
            raise DatasetError(
                f"no replay buffer at {path}: the path does not exist (check data.path, or record data "
                "first, e.g. with scd-collect)"
            )
        if not path.is_dir() or not ((path / "zarr.json").is_file() or (path / ".zgroup").is_file()):
            raise DatasetError(
                f"{path} is not a zarr group (no zarr.json or .zgroup inside); expected a replay buffer "
                "directory with data/<key> arrays and meta/episode_ends"
            )
        try:
            group = zarr.open_group(path, mode="r" if mode == "r" else "r+")
        except Exception as exc:  # zarr raises many types for a damaged store; report one
            raise DatasetError(f"cannot open the zarr group at {path}: {exc}") from exc
        if mode == "a" and group.metadata.zarr_format != 3:
            raise DatasetError(
                f"{path} is a zarr format {group.metadata.zarr_format} buffer (e.g. from Diffusion Policy); "
                "it opens read-only (mode='r'). To add episodes, copy it into a new buffer made with "
                "ReplayBuffer.create and append_episode"
            )
        buffer = cls(path, group, read_only=(mode == "r"), check_chunks=check_chunks)
        if mode == "a":
            buffer._repair_after_crash()
        return buffer

    # ------------------------------------------------------------------ index and validation
    def _read_format_version(self) -> int:
        """The scd format version; 0 for a buffer not written by us (e.g. Diffusion Policy's zarr 2)."""
        stored = self._group.attrs.get("meta", {})
        if self._group.metadata.zarr_format != 3 or not isinstance(stored, dict):
            return 0
        if stored.get("format") != FORMAT_NAME:
            return 0
        version = stored.get("format_version", 1)
        if not isinstance(version, int) or version < 1:
            raise DatasetError(f"{self.path}: format_version {version!r} in its meta is not a version number")
        if version > FORMAT_VERSION:
            raise DatasetError(
                f"{self.path} has replay-buffer format_version {version}; this scd-policy reads versions up "
                f"to {FORMAT_VERSION} (update scd-policy)"
            )
        return version

    def _load_index(self, check_chunks: bool) -> None:
        group = self._group
        if "data" not in group or not isinstance(group["data"], zarr.Group):
            raise DatasetError(f"{self.path} has no 'data' group; expected data/<key> arrays")
        if not (self.path / "meta" / "episode_ends").is_dir():
            raise DatasetError(
                f"{self.path} has no 'meta/episode_ends' array; it is not a replay buffer (or it is damaged)"
            )
        try:
            ends_array = group["meta/episode_ends"]
            if not isinstance(ends_array, zarr.Array):
                raise TypeError("it is a group, not an array")
        except Exception as exc:  # zarr raises many types for a damaged array; report one
            raise DatasetError(f"cannot read meta/episode_ends in {self.path}: {exc}") from exc
        if not self.read_only:
            ends_array = ends_array.with_config(_WRITE_ALL_CHUNKS)
        self._ends_array = ends_array
        # An absent episode_ends chunk is damage in every format (no committed end is 0, so no chunk
        # of it is ever all fill value): it would read as zeros and be reported as a wrong index.
        self._raise_on(self._scan_files(ends_array, ends_array.shape[0], absent_is_fatal=True))
        ends = self._guarded_read(ends_array, 0, ends_array.shape[0], lambda: np.asarray(ends_array[:]))
        self._check_episode_ends(ends)
        self._episode_ends = ends.astype(np.int64)

        data_group = group["data"]
        assert isinstance(data_group, zarr.Group)
        self._arrays = {}
        # List the children from the directory rather than through zarr, which parses every child's
        # metadata while listing: one damaged array should be reported by name.
        names = sorted(child.name for child in (self.path / "data").iterdir() if child.is_dir())
        for key in names:
            try:
                array = data_group[key]
            except Exception as exc:
                raise DatasetError(f"cannot read array data/{key} in {self.path}: {exc}") from exc
            if not isinstance(array, zarr.Array) or array.ndim < 1:
                raise DatasetError(f"data/{key} in {self.path} is not a time-major array (n_steps, ...)")
            # Appends to any buffer write all chunks: costs nothing and keeps new chunks checkable.
            self._arrays[key] = array if self.read_only else array.with_config(_WRITE_ALL_CHUNKS)
        n_steps = self.n_steps
        if n_steps > 0 and not self._arrays:
            raise DatasetError(f"{self.path}: meta/episode_ends counts {n_steps} steps but data/ is empty")
        residue = []
        for key, array in self._arrays.items():
            if array.shape[0] < n_steps:
                lengths = {k: a.shape[0] for k, a in self._arrays.items()}
                raise DatasetError(
                    f"data/{key} in {self.path} has {array.shape[0]} steps but meta/episode_ends[-1] = "
                    f"{n_steps}; every data array must hold all steps (array lengths: {lengths})"
                )
            if array.shape[0] > n_steps:
                residue.append(key)
        if residue and self.read_only:
            warnings.warn(
                f"{self.path}: data arrays {residue} hold steps past meta/episode_ends[-1]={n_steps} "
                "(left by an interrupted append); they are ignored. Open with mode='a' to cut them off.",
                stacklevel=3,
            )
        if check_chunks:
            self._check_chunk_files()

    # ------------------------------------------------------------------ chunk integrity
    @property
    def checksummed(self) -> bool:
        """Whether this buffer is format version >= 2: checksummed chunks, all of them written."""
        return self._checksummed

    def _stored_arrays(self) -> list[tuple[zarr.Array[Any], int]]:
        """Every array with the number of its leading rows that are committed (episode_ends first)."""
        return [(self._ends_array, self.n_episodes), *((a, self.n_steps) for a in self._arrays.values())]

    @staticmethod
    def _grid(
        array: zarr.Array[Any], rows: int, time_blocks: Iterable[int] | None = None
    ) -> Iterator[tuple[int, ...]]:
        """Chunk coordinates covering the first ``rows`` rows (or only the given time blocks)."""
        # A sharded array stores one file per shard, so the storage grid is the shard grid.
        storage = array.shards or array.chunks
        axes: list[Iterable[int]] = [
            range(math.ceil(rows / storage[0])) if time_blocks is None else time_blocks
        ]
        axes += [
            range(math.ceil(size / chunk)) for size, chunk in zip(array.shape[1:], storage[1:], strict=True)
        ]
        return itertools.product(*axes)

    def _chunk_file(self, array: zarr.Array[Any], coords: tuple[int, ...]) -> Path:
        # zarr's own key encoding (format 3 "c/0/0", format 2 "0.0", or a custom separator).
        return self.path / array.path / array.metadata.encode_chunk_key(coords)

    def _time_blocks(self, array: zarr.Array[Any], start: int, stop: int) -> range:
        chunk = (array.shards or array.chunks)[0]
        return range(start // chunk, (stop - 1) // chunk + 1) if stop > start else range(0)

    def _file_problem(
        self, array: zarr.Array[Any], coords: tuple[int, ...], absent_is_fatal: bool, check_header: bool
    ) -> ChunkProblem | None:
        """What the file system says about one chunk file: absent, empty or (with ``check_header``)
        shorter than its blosc header says; None when it looks whole."""
        file = self._chunk_file(array, coords)
        try:
            size = os.stat(file).st_size
        except FileNotFoundError:
            if absent_is_fatal:
                return ChunkProblem(array.path, file, "missing")
            return ChunkProblem(array.path, file, "absent", fatal=False)
        except OSError as exc:
            return ChunkProblem(array.path, file, "undecodable", f"cannot stat it: {exc}")
        if size == 0:
            # No codec ever writes an empty chunk (blosc has a header, crc32c 4 bytes).
            return ChunkProblem(array.path, file, "truncated", "the file is empty")
        if check_header:
            try:
                expected = self._blosc_length(array, file)
            except OSError as exc:
                return ChunkProblem(array.path, file, "undecodable", f"cannot read it: {exc}")
            if expected is not None and size < expected:
                detail = f"{size} bytes on disk, its blosc header says {expected}"
                return ChunkProblem(array.path, file, "truncated", detail)
        return None

    @staticmethod
    def _blosc_length(array: zarr.Array[Any], file: Path) -> int | None:
        """The file size a blosc-compressed chunk's header promises; None for other compressors.

        A blosc frame records its compressed length in bytes 12..15 of its 16-byte header, so a cut-off
        file can be told apart from one whose bytes changed, which a checksum alone cannot do.
        """
        compressors = array.compressors
        if not compressors or not isinstance(compressors[0], BloscCodec | numcodecs.Blosc):
            return None
        # Trailing checksums after blosc (ours: exactly one crc32c) add 4 bytes each.
        trailer = 4 * sum(isinstance(codec, Crc32cCodec) for codec in compressors[1:])
        with open(file, "rb") as handle:
            header = handle.read(16)
        if len(header) < 16:
            return 16 + trailer  # not even a whole header: the least a chunk can be
        return int.from_bytes(header[12:16], "little") + trailer

    def _scan_files(
        self,
        array: zarr.Array[Any],
        rows: int,
        time_blocks: Iterable[int] | None = None,
        absent_is_fatal: bool | None = None,
    ) -> list[ChunkProblem]:
        fatal = self._checksummed if absent_is_fatal is None else absent_is_fatal
        # Without a checksum a cut-off chunk is not safe to hand to blosc: blosc trusts the length in
        # its header and reads past the end of the buffer, so the chunk may decode into garbage instead
        # of failing. For those buffers the header is checked too (one 16-byte read per chunk).
        header = not self._checksummed
        grid = self._grid(array, rows, time_blocks)
        problems = (self._file_problem(array, coords, fatal, header) for coords in grid)
        return [problem for problem in problems if problem is not None]

    def _report(self, problems: list[ChunkProblem]) -> str:
        if len(problems) == 1:
            return problems[0].message(self.path)
        listed = "".join(f"\n  - {problem.describe()}" for problem in problems[:_LISTED_PROBLEMS])
        more = len(problems) - _LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        count = f"{len(problems)} damaged chunk files"
        return f"dataset {self.path}: {count}:{listed}{tail}\nfix: {_fix_hint(self.path)}"

    def _raise_on(self, problems: list[ChunkProblem]) -> None:
        fatal = [problem for problem in problems if problem.fatal]
        if fatal:
            raise DatasetError(self._report(fatal))

    def _check_chunk_files(self) -> None:
        """On open: every chunk file of the data arrays over the committed steps exists, is not empty and,
        in a buffer without checksums, is as long as its blosc header says."""
        for array in self._arrays.values():
            problems = self._scan_files(array, self.n_steps)
            self._raise_on(problems)
            if problems:  # only non-fatal ones are left: absent chunks of an older format
                first = problems[0]
                warnings.warn(
                    f"dataset {self.path}: {array.path}: {len(problems)} chunk file(s) absent (first: "
                    f"{first.file}); this buffer's older format (no checksums) skipped writing all-zero "
                    "chunks, so those steps read as 0. If they should not be zero, the files were lost: "
                    f"{_fix_hint(self.path)}",
                    DatasetWarning,
                    stacklevel=5,
                )

    def _decode_problem(self, array: zarr.Array[Any], coords: tuple[int, ...]) -> ChunkProblem | None:
        """Read one chunk on its own: what, if anything, is wrong with it."""
        fatal = self._checksummed or array is self._ends_array
        problem = self._file_problem(array, coords, fatal, check_header=True)
        if problem is not None:
            return problem
        file = self._chunk_file(array, coords)
        try:
            array.get_block_selection(coords)
        except Exception as exc:  # blosc, the checksum codec and zarr raise many types; classify them
            text = f"{type(exc).__name__}: {exc}"
            if "checksum" in text.lower():
                # The codec's message is two raw CRC values: no help to anyone reading the report.
                return ChunkProblem(array.path, file, "checksum mismatch")
            return ChunkProblem(array.path, file, "undecodable", text[:200])
        return None

    def _guarded_read(self, array: zarr.Array[Any], start: int, stop: int, read: Callable[[], _T]) -> _T:
        """Run a read of rows [start, stop); any failure becomes a DatasetError naming the chunk file(s)."""
        return self._guarded(
            array, self._time_blocks(array, start, stop), stop, f"steps {start}..{stop - 1}", read
        )

    def _guarded(
        self, array: zarr.Array[Any], blocks: Iterable[int], stop: int, what: str, read: Callable[[], _T]
    ) -> _T:
        """Run ``read``, which touches these time blocks of ``array`` (rows below ``stop``)."""
        blocks = list(blocks)
        # Before reading: a file deleted after opening would read as zeros without a word, and an
        # unchecksummed cut-off one may decode into garbage (see _scan_files). A stat (and, without
        # checksums, a 16-byte header read) per touched chunk is cheap next to decompressing it.
        self._raise_on(self._scan_files(array, stop, blocks))
        try:
            return read()
        except Exception as exc:  # zarr/blosc name neither the file nor the dataset: find the culprit
            found = (self._decode_problem(array, coords) for coords in self._grid(array, stop, blocks))
            problems = [problem for problem in found if problem is not None and problem.fatal]
            if problems:
                raise DatasetError(self._report(problems)) from None
            raise DatasetError(
                f"dataset {self.path}: cannot read {what} of {array.path}: {type(exc).__name__}: {exc}; "
                f"{_fix_hint(self.path)}"
            ) from exc

    def chunk_count(self) -> int:
        """How many chunk files ``verify`` reads (the committed part of every array)."""
        return sum(sum(1 for _ in self._grid(array, rows)) for array, rows in self._stored_arrays())

    def verify(self, progress: Callable[[int], None] | None = None) -> list[ChunkProblem]:
        """Read and decode every chunk over the committed steps; the damaged ones, in array order.

        In a checksummed buffer (format version >= 2) this checks every chunk's CRC-32C, so any
        changed byte is found; in older buffers only chunks that no longer decompress are. Absent
        chunks of older buffers come back with ``fatal=False`` (they may be legitimately all zero).
        ``progress`` is called with 1 after each chunk (e.g. ``tqdm.update``).
        """
        problems: list[ChunkProblem] = []
        for array, rows in self._stored_arrays():
            for coords in self._grid(array, rows):
                problem = self._decode_problem(array, coords)
                if problem is not None:
                    problems.append(problem)
                if progress is not None:
                    progress(1)
        return problems

    def _check_episode_ends(self, ends: np.ndarray) -> None:
        where = f"meta/episode_ends in {self.path}"
        if ends.ndim != 1 or not np.issubdtype(ends.dtype, np.integer):
            raise DatasetError(f"{where} must be a 1-D integer array, got {ends.shape} {ends.dtype}")
        if ends.size and ends[0] <= 0:
            raise DatasetError(f"{where} starts with {ends[0]}; every episode needs at least one step (> 0)")
        steps = np.diff(ends)
        if steps.size and (steps <= 0).any():
            bad = int(np.argmax(steps <= 0)) + 1
            raise DatasetError(
                f"{where} must be strictly increasing cumulative ends, but entry {bad} is {ends[bad]} after "
                f"{ends[bad - 1]}"
            )

    def _repair_after_crash(self) -> None:
        """Cut data rows past the last committed episode (residue of an interrupted append)."""
        n_steps = self.n_steps
        if n_steps == 0 and self._arrays:
            # No episode was ever committed, so the arrays' schema was never committed either: drop
            # them so the next append may define it afresh.
            data_group = self._group["data"]
            assert isinstance(data_group, zarr.Group)
            for key in list(self._arrays):
                del data_group[key]
            self._arrays = {}
            self._write_schema()
            return
        for array in self._arrays.values():
            if array.shape[0] > n_steps:
                array.resize((n_steps, *array.shape[1:]))

    # ------------------------------------------------------------------ properties
    @property
    def n_episodes(self) -> int:
        return int(self._episode_ends.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self._episode_ends[-1]) if self._episode_ends.size else 0

    @property
    def episode_ends(self) -> np.ndarray:
        return self._episode_ends.copy()

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self._episode_ends, prepend=0)

    @property
    def keys(self) -> list[str]:
        return list(self._arrays)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-step shape of every key (the array shape without its time axis)."""
        return {key: tuple(int(d) for d in array.shape[1:]) for key, array in self._arrays.items()}

    @property
    def dtypes(self) -> dict[str, np.dtype[Any]]:
        return {key: np.dtype(array.dtype) for key, array in self._arrays.items()}

    @property
    def zarr_format(self) -> int:
        return int(self._group.metadata.zarr_format)

    @property
    def meta(self) -> dict[str, Any]:
        """The dataset record: stored attributes plus keys/shapes/dtypes read from the arrays."""
        stored = self._group.attrs.get("meta", {})
        record: dict[str, Any] = json.loads(json.dumps(stored)) if isinstance(stored, dict) else {}
        record.setdefault("fps", None)
        record.setdefault("source", None)
        record.setdefault("card", {})
        record.update(self._schema_record())
        return record

    def _schema_record(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "shapes": {key: list(shape) for key, shape in self.shapes.items()},
            "dtypes": {key: dtype.str for key, dtype in self.dtypes.items()},
        }

    def update_meta(self, **values: Any) -> None:
        """Set fields of the dataset record (JSON-able values; keys/shapes/dtypes are derived)."""
        self._require_writable("update_meta")
        derived = sorted(set(values) & set(DERIVED_META_KEYS))
        if derived:
            raise DatasetError(f"meta keys {derived} are derived from the data by the buffer; leave them out")
        _check_json(values, "replay buffer meta")
        stored = self._group.attrs.get("meta", {})
        record = dict(stored) if isinstance(stored, dict) else {}
        record.update(values)
        self._group.attrs["meta"] = record

    def _write_schema(self) -> None:
        stored = self._group.attrs.get("meta", {})
        record = dict(stored) if isinstance(stored, dict) else {}
        record.update(self._schema_record())
        self._group.attrs["meta"] = record

    def _require_writable(self, what: str) -> None:
        if self.read_only:
            raise DatasetError(f"{what}: {self.path} is open read-only; open it with mode='a'")

    # ------------------------------------------------------------------ reading
    def _check_key(self, key: str) -> zarr.Array[Any]:
        if key not in self._arrays:
            raise KeyError(f"no data key {key!r} in {self.path}; known keys: {self.keys}")
        return self._arrays[key]

    def episode_slice(self, index: int) -> slice:
        """Global step range of episode ``index`` (negative indices count from the end)."""
        n = self.n_episodes
        if not -n <= index < n:
            raise IndexError(f"episode index {index} out of range for {n} episodes in {self.path}")
        index %= n
        start = int(self._episode_ends[index - 1]) if index > 0 else 0
        return slice(start, int(self._episode_ends[index]))

    def get_episode(self, index: int) -> dict[str, np.ndarray]:
        """Every key's arrays for one episode, (T, *shape) each."""
        span = self.episode_slice(index)
        return {key: self._read_range(key, span.start, span.stop) for key in self._arrays}

    def _read_range(self, key: str, start: int, stop: int) -> np.ndarray:
        if key in self._cache:
            return self._cache[key][start:stop].copy()
        array = self._check_key(key)
        return self._guarded_read(array, start, stop, lambda: np.asarray(array[start:stop]))

    def load(self, key: str) -> np.ndarray:
        """All committed steps of one key as an in-memory array (n_steps, *shape)."""
        self._check_key(key)
        return self._read_range(key, 0, self.n_steps)

    def cache(self, keys: Iterable[str]) -> None:
        """Keep these keys in memory, so ``get_steps`` on them is a numpy gather (for small arrays)."""
        for key in keys:
            if key not in self._cache:
                self._cache[key] = self.load(key)

    def get_steps(self, key: str, indices: npt.ArrayLike) -> np.ndarray:
        """Rows at arbitrary global step indices (any order, repeats allowed): (len(indices), *shape)."""
        array = self._check_key(key)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise IndexError(f"get_steps({key!r}) takes a 1-D index array, got shape {idx.shape}")
        if idx.size == 0:
            return np.zeros((0, *array.shape[1:]), dtype=array.dtype)
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= self.n_steps:
            raise IndexError(f"step indices [{low}, {high}] out of range [0, {self.n_steps}) for {key!r}")
        if key in self._cache:
            return self._cache[key][idx]
        unique, inverse = np.unique(idx, return_inverse=True)
        # A training window is a short run of consecutive steps (with repeats from edge padding):
        # one contiguous read is then cheapest. Scattered indices go through zarr's orthogonal gather.
        if high - low + 1 <= 2 * unique.size:
            block = self._guarded_read(array, low, high + 1, lambda: np.asarray(array[low : high + 1]))
            return block[idx - low]
        rows = self._guarded_gather(array, unique)
        return rows[inverse.reshape(-1)]

    def _guarded_gather(self, array: zarr.Array[Any], unique: np.ndarray) -> np.ndarray:
        """Rows at sorted unique indices via zarr's gather; failures name the chunk files involved."""
        chunk = (array.shards or array.chunks)[0]
        blocks = [int(block) for block in np.unique(unique // chunk)]
        return self._guarded(
            array,
            blocks,
            int(unique[-1]) + 1,
            f"{unique.size} scattered steps",
            lambda: np.asarray(array.get_orthogonal_selection((unique,))),
        )

    # ------------------------------------------------------------------ writing
    def append_episode(self, episode: dict[str, np.ndarray]) -> None:
        """Append one episode: every array (T, *shape) with the same T >= 1; keys/shapes/dtypes as stored."""
        self._require_writable("append_episode")
        arrays = self._validate_episode(episode)
        length = next(iter(arrays.values())).shape[0]
        start, stop = self.n_steps, self.n_steps + length
        if not self._arrays:
            self._create_arrays(arrays)
        # 1) data rows first: until episode_ends changes, readers do not see them.
        for key, values in arrays.items():
            array = self._arrays[key]
            array.resize((stop, *array.shape[1:]))
            array[start:stop] = values
        # 2) commit.
        self._commit_episode_end(stop)
        self._episode_ends = np.append(self._episode_ends, np.int64(stop))
        if self._cache:
            for key in list(self._cache):
                self._cache[key] = np.concatenate([self._cache[key], arrays[key]], axis=0)

    def _commit_episode_end(self, end: int) -> None:
        """Add ``end`` to meta/episode_ends with a single atomic file replace as the commit point.

        Growing the array and then writing the value would leave a window in which the new last end
        reads as the fill value. Instead the value is written into the chunk first through a handle
        that already has the larger shape (its chunk file holds positions past the stored shape, which
        readers never see), and only then is the stored shape grown, by one atomic zarr.json replace.
        """
        array = self._ends_array
        n = array.shape[0]
        metadata = array.metadata
        assert isinstance(metadata, ArrayV3Metadata)  # only format-3 buffers open for appending
        grown = zarr.Array(zarr.AsyncArray(metadata.update_shape((n + 1,)), array.store_path, array.config))
        grown[n] = end
        array.resize((n + 1,))

    def _validate_episode(self, episode: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(episode, Mapping) or not episode:
            raise DatasetError("append_episode takes a non-empty dict of key -> array (T, *shape)")
        arrays = {str(key): np.asarray(value) for key, value in episode.items()}
        for key, values in arrays.items():
            if values.ndim < 1:
                raise DatasetError(f"episode[{key!r}] is a scalar; expected a time-major array (T, *shape)")
            if "/" in key or not key:
                raise DatasetError(f"episode key {key!r} is not a valid array name (non-empty, no '/')")
        lengths = {key: int(values.shape[0]) for key, values in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise DatasetError(f"episode arrays must share their length T on axis 0, got {lengths}")
        if next(iter(lengths.values())) < 1:
            raise DatasetError("an episode needs at least one step (T >= 1)")
        if self._arrays:
            expected, given = set(self._arrays), set(arrays)
            if expected != given:
                raise DatasetError(
                    f"episode keys {sorted(given)} do not match the buffer's keys {sorted(expected)} in "
                    f"{self.path} (missing: {sorted(expected - given)}, extra: {sorted(given - expected)})"
                )
            for key, values in arrays.items():
                shape, dtype = self.shapes[key], self.dtypes[key]
                if values.shape[1:] != shape:
                    raise DatasetError(
                        f"episode[{key!r}] has per-step shape {values.shape[1:]}; {self.path} stores {shape}"
                    )
                if values.dtype != dtype:
                    raise DatasetError(
                        f"episode[{key!r}] has dtype {values.dtype}; {self.path} stores {dtype} "
                        f"(convert with .astype(np.{dtype.name}))"
                    )
        for key, values in arrays.items():
            if values.dtype.kind not in "biuf":
                raise DatasetError(f"episode[{key!r}] has dtype {values.dtype}; expected a numeric array")
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                bad_step = int(np.argwhere(~np.isfinite(values))[0][0])
                raise DatasetError(f"episode[{key!r}] holds NaN or inf (first at step {bad_step})")
        return arrays

    def _create_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        data_group = self._group["data"]
        assert isinstance(data_group, zarr.Group)
        for key, values in sorted(arrays.items()):
            step_shape = tuple(values.shape[1:])
            self._arrays[key] = data_group.create_array(
                key,
                shape=(0, *step_shape),
                chunks=(time_chunk_for(step_shape, values.dtype), *step_shape),
                dtype=values.dtype,
                compressors=_compressors(values.dtype),
                fill_value=0,
                config=_WRITE_ALL_CHUNKS,
            )
        self._write_schema()

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer({str(self.path)!r}, episodes={self.n_episodes}, steps={self.n_steps}, "
            f"shapes={self.shapes}, read_only={self.read_only})"
        )
