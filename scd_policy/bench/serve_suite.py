"""The ``serve`` suite: a fleet of n lockstep sessions served by ``scd-serve``, against n local runtimes.

Three ways to give n robots (or simulators) an action per tick, each measured on the same SCD policy
(the bench's untrained weights, saved once and served from that folder):

- ``local``: n separate single-stream ``PolicyRuntime``\\ s in this process, stepped one after another
  (what n robots importing the library cost this machine); latency = one runtime's own step;
- ``served_unbatched``: an ``scd-serve`` process with ``batching=false`` (every request its own tick),
  n ``PolicyClient`` sessions sending together; latency = the client's round trip;
- ``served_batched``: the same with cross-session batching (one encoder call and one decoder run per
  tick for all sessions that sent).

Every tick, every session sends its observation and waits for its action (a ``ClientFleet`` step).
Settings run interleaved, round-robin, ``serve_ticks`` ticks per round (several open-loop cycles, so
replan and queue-only ticks both count). Rows: actions/s (n x ticks / wall time) and the p50/p99 of
the per-session latencies, with ``speedup_vs_unbatched`` (actions/s over ``served_unbatched`` at the
same n) and ``p99_vs_single`` (p99 over the same mode's p99 at one session).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scd_policy.bench.measure import interleaved
from scd_policy.policies import Policy
from scd_policy.runtime import PolicyRuntime

if TYPE_CHECKING:
    from scd_policy.serve.client import ClientFleet

log = logging.getLogger("scd_policy.bench")

Row = dict[str, Any]
MODES = ("local", "served_unbatched", "served_batched")


def serve_suite(
    policy: Policy,
    sessions: list[int],
    ticks: int,
    rounds: int,
    warmup: int,
    threads: int,
    latency_ticks: int,
    observe: Callable[[int], dict[str, np.ndarray]],
    common: dict[str, Any],
) -> list[Row]:
    """Rows of the suite for ``policy`` (see the module doc); ``observe(n)`` gives a tick's observations
    for n sessions (leading axis n)."""
    from scd_policy.serve.client import ClientFleet
    from scd_policy.serve.process import ServerProcess

    latencies: dict[tuple[str, int], list[float]] = {(m, n): [] for m in MODES for n in sessions}
    with tempfile.TemporaryDirectory(prefix="scd-bench-serve-") as folder:
        policy.save_pretrained(folder)
        # Every fleet stays connected for the whole run (interleaved rounds).
        options = [
            f"num_threads={threads}",
            f"max_sessions={sum(sessions)}",
            f"latency_ticks={latency_ticks}",
        ]
        with (
            ServerProcess(Path(folder), [*options, "batching=false"]) as unbatched,
            ServerProcess(Path(folder), [*options, "batching=true"]) as batched,
        ):
            actions: dict[tuple[str, int], Callable[[], float | None]] = {}
            fleets: list[ClientFleet] = []
            try:
                for n in sessions:
                    for mode, server in (("served_unbatched", unbatched), ("served_batched", batched)):
                        fleet = ClientFleet(server.url, n)
                        fleets.append(fleet)
                        actions[(mode, n)] = _served(fleet, ticks, observe, latencies[(mode, n)])
                    runtimes = [PolicyRuntime(policy, seed=i, latency_ticks=latency_ticks) for i in range(n)]
                    actions[("local", n)] = _local(runtimes, ticks, observe, latencies[("local", n)])
                log.info("serve: %d settings x %d rounds of %d ticks", len(actions), rounds, ticks)
                walls = interleaved(actions, rounds, warmup)
            finally:
                for fleet in fleets:
                    fleet.close()
    # Latencies were collected in the warm-up rounds too: keep the measured rounds' share.
    rows: list[Row] = []
    for (mode, n), wall_ms in walls.items():
        per_session = np.asarray(latencies[(mode, n)][-rounds * ticks * n :])
        rows.append(
            {
                "suite": "serve",
                "policy": policy.config.type,
                "mode": mode,
                "K": policy.config.diffusion.num_inference_steps,
                "history": None,
                "batch": n,
                "p50_ms": float(np.percentile(per_session, 50)),
                "p90_ms": float(np.percentile(per_session, 90)),
                "p99_ms": float(np.percentile(per_session, 99)),
                "mean_ms": float(per_session.mean()),
                "actions_per_s": 1000.0 * n * ticks * len(wall_ms) / float(np.sum(wall_ms)),
                "ticks_per_round": ticks,
                "latency_ticks": latency_ticks,
                "n": float(per_session.size),
                **common,
            }
        )
    _add_serve_ratios(rows)
    return rows


def _served(
    fleet: ClientFleet, ticks: int, observe: Callable[[int], dict[str, np.ndarray]], sink: list[float]
) -> Callable[[], float | None]:
    observations = [observe(fleet.num_envs) for _ in range(ticks)]

    def run() -> None:
        for obs in observations:
            fleet.step(obs)
            sink.extend(client.last_timing["round_trip_ms"] for client in fleet.clients)

    return run


def _local(
    runtimes: list[PolicyRuntime],
    ticks: int,
    observe: Callable[[int], dict[str, np.ndarray]],
    sink: list[float],
) -> Callable[[], float | None]:
    observations = [observe(len(runtimes)) for _ in range(ticks)]

    def run() -> None:
        for obs in observations:
            for i, runtime in enumerate(runtimes):
                start = time.perf_counter()
                runtime.step({key: value[i] for key, value in obs.items()})
                sink.append(1000.0 * (time.perf_counter() - start))

    return run


def _add_serve_ratios(rows: list[Row]) -> None:
    by = {(r["mode"], r["batch"]): r for r in rows}
    single = min(r["batch"] for r in rows)
    for row in rows:
        base = by.get(("served_unbatched", row["batch"]))
        row["speedup_vs_unbatched"] = row["actions_per_s"] / base["actions_per_s"] if base else None
        one = by.get((row["mode"], single))
        row["p99_vs_single"] = row["p99_ms"] / one["p99_ms"] if one else None
