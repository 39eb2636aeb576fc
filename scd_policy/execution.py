"""How sampled action chunks become one action per tick, per stream (used by ``PolicyRuntime``).

Two executors with one interface (``reset``, ``needs_chunk``, ``store``, ``pop``):

- ``ChunkQueue`` (open loop): a chunk's actions are executed one per tick, ``n_action_steps`` of them,
  then the next chunk takes over;
- ``EnsembledChunks`` (replan every step): a chunk every tick, the executed action the ACT-style
  temporal ensemble of every chunk's prediction for the current tick (``TemporalEnsembler``).

Latency budget (``latency_ticks`` = d). On a robot a chunk is not ready the tick it is asked for: the
next one must be computed while the current one is still being executed. A chunk planned from tick
t's observation is therefore only used from tick t + d on, and its first d actions (meant for ticks
already past) are skipped; the first chunk of an episode is used at once (a robot waits for it). With
d = 0 this is plain synchronous execution. The executors realise that schedule exactly, so the same
code measures a policy under an injected delay in simulation and serves a real asynchronous client.

Seams (open loop). Where the next chunk takes over, the new chunk and the old one disagree (different
noise, a newer observation): ``seam="switch"`` jumps to the new chunk; ``seam="blend"`` cross-fades
from the old chunk's own continuation for those ticks to the new chunk over ``blend_ticks`` ticks
(linear weights (j + 1) / (blend_ticks + 1)), so the commanded motion has no step at the seam.
``seam="inpaint"`` conditions the new chunk on the actions already committed instead: it is sampled
with its first latency_ticks actions fixed to the ones the old chunk executes meanwhile
(``Policy.sample(prefix=...)``), so it continues from them in the same mode. Blending two chunks that
chose different modes (left and right of an obstacle) averages them; inpainting cannot. With
latency_ticks = 0 nothing is committed and it is a plain switch.
"""

from __future__ import annotations

import torch
from torch import Tensor

SEAMS = ("switch", "blend", "inpaint")


class TemporalEnsembler:
    """ACT-style temporal ensembling of overlapping action chunks, per stream.

    A chunk of length L added at tick s predicts ticks s .. s+L-1. At tick t the executed action is
    the weighted mean of every prediction for t, one from each chunk added at ticks
    max(t - L + 1, episode start) .. t, with weight ``exp(-decay * j)`` for the j-th oldest of them
    (j = 0: the oldest, as in ACT). ``decay = 0`` gives the plain average; a large decay follows the
    oldest chunk (open loop for L ticks). A tick may add no chunk for some streams (``has_chunk``):
    they are then served from the chunks already in play.

    Two bookkeepings of which chunks are in play. While every tick adds a chunk to every stream (a
    replanning runtime's ticks), stream b's chunks in play are the ``count[b]`` newest, and the weights
    depend on that count alone (a table): ``add(None, chunk)`` is then a handful of tensor ops. Once a
    tick skips a chunk or serves a subset of the streams, ``valid`` (B, L) per age takes over, until
    the next reset of every stream.
    """

    def __init__(self, num_envs: int, chunk_len: int, action_dim: int, decay: float, device: torch.device):
        if decay < 0:
            raise ValueError(f"ensemble_decay must be >= 0, got {decay}")
        self.decay = decay
        self.chunk_len = chunk_len
        # chunks[b, a, i]: the prediction, for tick now + i, of stream b's chunk added a ticks ago.
        self.chunks = torch.zeros(num_envs, chunk_len, chunk_len, action_dim, device=device)
        self._spare = torch.zeros_like(self.chunks)  # the next tick's chunks are written here
        self._count: Tensor | None = torch.zeros(num_envs, dtype=torch.long, device=device)
        self._valid = torch.zeros(num_envs, chunk_len, dtype=torch.bool, device=device)  # chunk of age a
        # weights[n]: the normalised weights per age when the n newest chunks are in play, (L + 1, L).
        rank = torch.arange(chunk_len, dtype=torch.float64)  # age a
        table = torch.zeros(chunk_len + 1, chunk_len, dtype=torch.float64)
        for n in range(1, chunk_len + 1):
            w = torch.exp(-decay * (n - 1 - rank[:n]))  # age a is the (n - 1 - a)-th oldest
            table[n, :n] = w / w.sum()
        self._weights = table.to(device=device, dtype=torch.float32)

    @property
    def valid(self) -> Tensor:
        """(B, L) bool: whether each stream's chunk of age a is in play."""
        if self._count is not None:
            ages = torch.arange(self.chunk_len, device=self._count.device)
            return ages[None, :] < self._count[:, None]
        return self._valid

    def reset(self, streams: Tensor | None = None) -> None:
        """Forget the chunks of every stream (None) or of the streams ``streams`` (bool (B,) or indices)."""
        if streams is None:
            self._count = torch.zeros_like(self._valid[:, 0], dtype=torch.long)
        elif self._count is not None:
            self._count[streams.to(self._count.device)] = 0
        else:
            self._valid[streams.to(self._valid.device)] = False

    def add(self, rows: Tensor | None, chunk: Tensor, has_chunk: Tensor | None = None) -> Tensor:
        """A new tick for streams ``rows`` (R,) (None: every stream, in order) with their new chunks
        (R, L, Da) (only where ``has_chunk`` (R,) is True, if given); returns the actions (R, Da) to
        execute now."""
        if chunk.shape[1] != self.chunk_len:
            raise ValueError(f"chunk of length {chunk.shape[1]}; the ensembler holds {self.chunk_len}")
        if rows is None and has_chunk is None and self._count is not None:
            return self._add_every_stream(chunk, self._count)
        if self._count is not None:  # from now on per age (see the class docstring)
            self._valid, self._count = self.valid, None
        if rows is None:
            rows = torch.arange(self.chunks.shape[0], device=self.chunks.device)
        old = self.chunks[rows]  # (R, L, L, Da)
        aged = torch.zeros_like(old)
        aged[:, 1:, :-1] = old[:, :-1, 1:]  # one tick older: the prediction for now moves one index left
        aged[:, 0] = chunk
        self.chunks[rows] = aged
        valid = torch.zeros_like(self._valid[rows])
        valid[:, 1:] = self._valid[rows][:, :-1]
        valid[:, 0] = True if has_chunk is None else has_chunk.to(valid.device)
        self._valid[rows] = valid
        # j: the rank of each chunk in play, oldest first (0 for the oldest).
        oldest_first = valid.flip(1).cumsum(1).flip(1) - 1
        weights = torch.exp(-self.decay * oldest_first.to(chunk.dtype)) * valid
        return (weights[:, :, None] * aged[:, :, 0]).sum(1) / weights.sum(1, keepdim=True)

    def _add_every_stream(self, chunk: Tensor, count: Tensor) -> Tensor:
        """``add`` for every stream, each given a chunk: the same schedule in place, weights looked up."""
        aged, old = self._spare, self.chunks
        # Entries (a >= 1, L - 1) keep stale values: they would reach index 0 (now) only at age >= L,
        # when their chunk is out of play, so they are never read.
        aged[:, 1:, :-1] = old[:, :-1, 1:]
        aged[:, 0] = chunk
        self.chunks, self._spare = aged, old
        count.add_(1).clamp_(max=self.chunk_len)
        weights = self._weights[count]  # (B, L)
        return (weights[:, :, None] * aged[:, :, 0]).sum(1)


class ChunkQueue:
    """Open-loop execution with a latency budget and seam handling (see the module doc).

    Per stream: the active chunk (L entries, entry i for tick planned + i) and the index of the entry
    executed next. The first chunk of an episode runs from entry 0; every later one is planned when the
    active chunk reaches entry ``n_action_steps`` and takes over ``latency_ticks`` ticks later, at its
    own entry ``latency_ticks``. So every chunk is executed for ``n_action_steps`` ticks (the first one
    for ``n_action_steps + latency_ticks``).
    """

    def __init__(
        self,
        num_envs: int,
        chunk_len: int,
        n_action_steps: int,
        action_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        latency_ticks: int = 0,
        seam: str = "switch",
        blend_ticks: int = 4,
    ) -> None:
        if seam not in SEAMS:
            raise ValueError(f"seam={seam!r}; expected one of {SEAMS}")
        if not 0 <= latency_ticks <= n_action_steps or n_action_steps + latency_ticks > chunk_len:
            raise ValueError(
                f"latency_ticks={latency_ticks} must be in [0, n_action_steps={n_action_steps}] with "
                f"n_action_steps + latency_ticks <= the chunk's {chunk_len} actions"
            )
        if blend_ticks < 1:
            raise ValueError(f"blend_ticks must be >= 1, got {blend_ticks}")
        self.n, self.d = n_action_steps, latency_ticks
        room = chunk_len - n_action_steps - latency_ticks  # what the old chunk holds past its last tick
        self.blend_ticks = min(blend_ticks, room) if seam == "blend" else 0
        # Inpainting: the new chunk's first actions are the committed ones, the old chunk's for those ticks.
        self.prefix_length = latency_ticks if seam == "inpaint" else 0
        shape = (num_envs, chunk_len, action_dim)
        self.chunk = torch.zeros(shape, device=device, dtype=dtype)
        self.pending = torch.zeros(shape, device=device, dtype=dtype)
        self.old = torch.zeros(shape, device=device, dtype=dtype)
        self.index = torch.full((num_envs,), -1, dtype=torch.long)  # -1: no chunk yet (plan now)
        self.has_pending = torch.zeros(num_envs, dtype=torch.bool)
        self.old_index = torch.zeros(num_envs, dtype=torch.long)
        self.blend_left = torch.zeros(num_envs, dtype=torch.long)

    def reset(self, streams: Tensor | None = None) -> None:
        every = slice(None) if streams is None else streams.to("cpu")
        self.index[every] = -1
        self.has_pending[every] = False
        self.blend_left[every] = 0

    def needs_chunk(self) -> Tensor:
        """The streams (CPU indices) that must be given a chunk this tick."""
        return ((self.index < 0) | ((self.index == self.n) & ~self.has_pending)).nonzero().flatten()

    def prefix(self, rows: Tensor) -> Tensor | None:
        """For streams ``rows`` planning now (not an episode's first chunk): the actions the new chunk
        must start with, (R, P, Da); None without inpainting."""
        if self.prefix_length == 0:
            return None
        return self.chunk[rows.to(self.chunk.device), self.n : self.n + self.prefix_length]

    def is_first(self, rows: Tensor) -> Tensor:
        """(R,) bool: the streams ``rows`` plan their episode's first chunk."""
        return self.index[rows] < 0

    def store(self, rows: Tensor, chunk: Tensor) -> None:
        """The chunks (R, L, Da) planned this tick for the streams ``rows`` (R,)."""
        fresh = self.index[rows] < 0
        rows_dev = rows.to(self.chunk.device)
        if bool(fresh.any()):  # an episode's first chunk is used at once, from its first entry
            first = rows_dev[fresh.to(rows_dev.device)]
            self.chunk[first] = chunk[fresh.to(chunk.device)]
            self.index[rows[fresh]] = 0
        later = ~fresh
        if bool(later.any()):
            self.pending[rows_dev[later.to(rows_dev.device)]] = chunk[later.to(chunk.device)]
            self.has_pending[rows[later]] = True

    def pop(self) -> Tensor:
        """This tick's action of every stream (N, Da)."""
        self._take_over()  # a chunk stored this tick with no delay
        streams = torch.arange(self.chunk.shape[0], device=self.chunk.device)
        action = self.chunk[streams, self.index.to(self.chunk.device)]  # (N, Da)
        blending = self.blend_left > 0
        if bool(blending.any()):
            step = (self.blend_ticks - self.blend_left[blending] + 1).to(action.dtype)  # 1 .. blend_ticks
            weight = (step / (self.blend_ticks + 1)).to(action.device)[:, None]
            rows = blending.to(action.device)
            previous = self.old[streams[rows], self.old_index[blending].to(action.device)]
            action[rows] = (1 - weight) * previous + weight * action[rows]
            self.old_index[blending] += 1
            self.blend_left[blending] -= 1
        self.index += 1
        # A delayed chunk takes over for the next tick now, so that next tick's needs_chunk() sees the
        # entry it will execute (with latency_ticks = n_action_steps it plans at once).
        self._take_over()
        return action

    def _take_over(self) -> None:
        """Pending chunks whose time has come become active, at their entry ``latency_ticks``."""
        due = self.has_pending & (self.index == self.n + self.d)
        if bool(due.any()):
            due_dev = due.to(self.chunk.device)
            self.old[due_dev] = self.chunk[due_dev]
            self.old_index[due] = self.index[due]
            self.chunk[due_dev] = self.pending[due_dev]
            self.index[due] = self.d
            self.has_pending[due] = False
            self.blend_left[due] = self.blend_ticks


class EnsembledChunks:
    """Replanning at every tick, executed through a ``TemporalEnsembler``, with a latency budget: the
    chunk planned at tick t joins the ensemble at tick t + d (its entries d.., so the ensembler holds
    chunks of L - d predictions); the first chunk of an episode joins at once."""

    def __init__(
        self,
        num_envs: int,
        chunk_len: int,
        action_dim: int,
        decay: float,
        device: torch.device,
        dtype: torch.dtype,
        latency_ticks: int = 0,
    ) -> None:
        # The episode's first chunk must last until the first delayed one arrives (tick d + 1).
        if not latency_ticks >= 0 or 2 * latency_ticks >= chunk_len:
            raise ValueError(
                f"latency_ticks={latency_ticks} with replanning at every step must be in "
                f"[0, {(chunk_len - 1) // 2}] (below half the chunk's {chunk_len} actions)"
            )
        self.d = latency_ticks
        self.ensembler = TemporalEnsembler(num_envs, chunk_len - latency_ticks, action_dim, decay, device)
        ring = max(latency_ticks, 1)
        self.delayed = torch.zeros(num_envs, ring, chunk_len, action_dim, device=device, dtype=dtype)
        self.delayed_valid = torch.zeros(num_envs, ring, dtype=torch.bool)
        self.tick = torch.zeros(num_envs, dtype=torch.long)  # ticks since the stream's episode start
        self.now = torch.zeros(num_envs, action_dim, device=device, dtype=dtype)
        self._every = torch.arange(num_envs)  # every stream plans every tick

    def reset(self, streams: Tensor | None = None) -> None:
        every = slice(None) if streams is None else streams.to("cpu")
        self.ensembler.reset(streams)
        self.delayed_valid[every] = False
        self.tick[every] = 0

    def needs_chunk(self) -> Tensor:
        return self._every  # read-only for callers

    def store(self, rows: Tensor, chunk: Tensor) -> None:
        d = self.d
        if d == 0 and rows.numel() == self.tick.shape[0]:
            # ``rows`` are needs_chunk()'s: every stream, in order, when there are as many.
            self.now.copy_(self.ensembler.add(None, chunk))
            self.tick += 1
            return
        rows_dev = rows.to(self.now.device)
        if d == 0:
            self.now[rows_dev] = self.ensembler.add(rows_dev, chunk)
        else:
            first = self.tick[rows] == 0
            slot = self.tick[rows] % d
            # Due now: the chunk planned d ticks ago (kept in this tick's ring slot), or an episode's
            # first chunk at once.
            ready = self.delayed_valid[rows, slot]
            due = self.delayed[rows_dev, slot.to(rows_dev.device)][:, d:]
            due = torch.where(first.to(chunk.device)[:, None, None], chunk[:, : chunk.shape[1] - d], due)
            has = (ready | first).to(rows_dev.device)
            self.now[rows_dev] = self.ensembler.add(rows_dev, due, has_chunk=has)
            later = ~first  # the first chunk is already in play; the others wait d ticks in the ring
            self.delayed[rows_dev[later.to(rows_dev.device)], slot[later].to(rows_dev.device)] = chunk[
                later.to(chunk.device)
            ]
            self.delayed_valid[rows[later], slot[later]] = True
            self.delayed_valid[rows[first], slot[first]] = False
        self.tick[rows] += 1

    def pop(self) -> Tensor:
        return self.now.clone()
