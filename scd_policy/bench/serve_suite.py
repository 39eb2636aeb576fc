"""The ``serve`` suite: a fleet of n lockstep sessions served by ``scd-serve``, against n local runtimes.

Three ways to give n robots (or simulators) an action per tick, each measured on the same SCD policy
(the bench's untrained weights, saved once and served from that folder):

- ``local``: n separate single-stream ``PolicyRuntime``\\ s in this process, stepped one after another
  (what n robots importing the library cost this machine); latency = one runtime's own step;
- ``served_unbatched``: an ``scd-serve`` process with ``batching=false`` (every request its own tick),
  n ``PolicyClient`` sessions sending together; latency = the client's round trip;
- ``served_batched``: the same with cross-session batching (one encoder call and one decoder run per
  tick for all sessions that sent);
- ``served_paced`` (``rate_hz`` > 0): n independent robots on a batching server, each its own client
  and thread ticking at ``rate_hz`` on its own clock. Robots that were switched on at different times
  neither tick at the same instant nor replan at the same tick, so robot i's clock is offset by i / n
  of a period and its episode by i ticks (mod the chunk's ``n_action_steps``): arrivals spread over
  each period and replans over each open-loop cycle, as in a fleet of real robots. Their server's
  ``batch_window_ms`` is ``paced_window_ms`` (0: batch the requests already queued, never wait).

``defer_encoding`` runs every session of every mode (served and local) with
``PolicyRuntime(defer_encoding=True)``: a tick without a replan only buffers its step.

In the lockstep modes every tick, every session sends its observation and waits for its action (a
``ClientFleet`` step): the worst case for tail latency, since every session replans at the same tick.
Settings run interleaved, round-robin, ``serve_ticks`` ticks per round (several open-loop cycles, so
replan and queue-only ticks both count). Rows: actions/s (n x ticks / wall time; for the paced robots
the rate they achieved, n x ``rate_hz`` when the server keeps up) and the p50/p99 of the per-session
latencies, with ``speedup_vs_unbatched`` (actions/s over ``served_unbatched`` at the same n; lockstep
modes only) and ``p99_vs_single`` (p99 over the same mode's p99 at one session).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scd_policy.bench.measure import interleaved
from scd_policy.policies import Policy
from scd_policy.runtime import PolicyRuntime

if TYPE_CHECKING:
    from scd_policy.serve.client import ClientFleet, PolicyClient

log = logging.getLogger("scd_policy.bench")

Row = dict[str, Any]
MODES = ("local", "served_unbatched", "served_batched", "served_paced")
LOCKSTEP = MODES[:3]


def serve_suite(
    policy: Policy,
    sessions: list[int],
    ticks: int,
    rounds: int,
    warmup: int,
    threads: int,
    latency_ticks: int,
    rate_hz: float,
    paced_window_ms: float,
    defer_encoding: bool,
    observe: Callable[[int], dict[str, np.ndarray]],
    common: dict[str, Any],
) -> list[Row]:
    """Rows of the suite for ``policy`` (see the module doc); ``observe(n)`` gives a tick's observations
    for n sessions (leading axis n)."""
    from scd_policy.serve.client import ClientFleet
    from scd_policy.serve.process import ServerProcess

    modes = MODES if rate_hz > 0 else LOCKSTEP
    latencies: dict[tuple[str, int], list[float]] = {(m, n): [] for m in modes for n in sessions}
    with tempfile.TemporaryDirectory(prefix="scd-bench-serve-") as folder:
        policy.save_pretrained(folder)
        # Every fleet stays connected for the whole run (interleaved rounds).
        options = [
            f"num_threads={threads}",
            f"max_sessions={sum(sessions)}",
            f"latency_ticks={latency_ticks}",
            f"defer_encoding={str(defer_encoding).lower()}",
        ]
        # The paced robots get a batching server of their own (its sessions' recent ticks, what the
        # batcher waits for, are not mixed with the lockstep fleets'), with its own batch window.
        with (
            ServerProcess(Path(folder), [*options, "batching=false"]) as unbatched,
            ServerProcess(Path(folder), [*options, "batching=true"]) as batched,
            ServerProcess(
                Path(folder), [*options, "batching=true", f"batch_window_ms={paced_window_ms:g}"]
            ) as paced,
        ):
            actions: dict[tuple[str, int], Callable[[], float | None]] = {}
            fleets: list[ClientFleet] = []
            try:
                for n in sessions:
                    for mode, server in (("served_unbatched", unbatched), ("served_batched", batched)):
                        fleet = ClientFleet(server.url, n)
                        fleets.append(fleet)
                        actions[(mode, n)] = _served(fleet, ticks, observe, latencies[(mode, n)])
                    runtimes = [
                        PolicyRuntime(
                            policy, seed=i, latency_ticks=latency_ticks, defer_encoding=defer_encoding
                        )
                        for i in range(n)
                    ]
                    actions[("local", n)] = _local(runtimes, ticks, observe, latencies[("local", n)])
                    if rate_hz > 0:
                        fleet = ClientFleet(paced.url, n)
                        fleets.append(fleet)
                        cycle = int(fleet.metadata["n_action_steps"])
                        _offset_episodes(fleet.clients, cycle, observe)
                        actions[("served_paced", n)] = _paced(
                            fleet.clients, ticks, rate_hz, observe, latencies[("served_paced", n)]
                        )
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
                "defer_encoding": defer_encoding,
                "rate_hz": rate_hz if mode == "served_paced" else None,
                "batch_window_ms": paced_window_ms if mode == "served_paced" else None,
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


def _offset_episodes(
    clients: list[PolicyClient], cycle: int, observe: Callable[[int], dict[str, np.ndarray]]
) -> None:
    """Step robot i ``i % cycle`` ticks into its episode, so the robots replan at different ticks."""
    for i, client in enumerate(clients):
        for _ in range(i % cycle):
            client.step({key: value[0] for key, value in observe(1).items()})


def _paced(
    clients: list[PolicyClient],
    ticks: int,
    rate_hz: float,
    observe: Callable[[int], dict[str, np.ndarray]],
    sink: list[float],
) -> Callable[[], float | None]:
    n, period = len(clients), 1.0 / rate_hz
    observations = [observe(n) for _ in range(ticks)]

    def robot(i: int, start: float, out: list[float], errors: list[BaseException]) -> None:
        client = clients[i]
        try:
            for tick, obs in enumerate(observations):
                # Its own clock: tick t at start + (t + i / n) periods; a late reply is not caught up on.
                wait = start + (tick + i / n) * period - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                client.step({key: value[i] for key, value in obs.items()})
                out.append(client.last_timing["round_trip_ms"])
        except BaseException as error:  # re-raised by run() in the bench's thread
            errors.append(error)

    def run() -> None:
        start = time.perf_counter()
        per_robot: list[list[float]] = [[] for _ in range(n)]
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=robot, args=(i, start, per_robot[i], errors), name=f"robot-{i}")
            for i in range(n)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        # The round lasts its ticks' periods (longer only if replies came late), so actions/s is the
        # rate achieved: n x rate_hz when the server keeps up.
        rest = start + ticks * period - time.perf_counter()
        if rest > 0:
            time.sleep(rest)
        for latencies in per_robot:
            sink.extend(latencies)

    return run


def _add_serve_ratios(rows: list[Row]) -> None:
    by = {(r["mode"], r["batch"]): r for r in rows}
    single = min(r["batch"] for r in rows)
    for row in rows:
        base = by.get(("served_unbatched", row["batch"]))
        lockstep = row["mode"] in LOCKSTEP
        row["speedup_vs_unbatched"] = (
            row["actions_per_s"] / base["actions_per_s"] if base and lockstep else None
        )
        one = by.get((row["mode"], single))
        row["p99_vs_single"] = row["p99_ms"] / one["p99_ms"] if one else None
