"""``scd-serve`` end to end: real server processes on 127.0.0.1, real clients, a real checkpoint.

Served actions equal the local runtime's (exactly for one session, to 1e-6 when batched), sessions free
their slot and memory stays flat, and every kind of bad input or failure gets its documented answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
from serve_helpers import TASK, VENV_BIN, free_port, serving
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from scd_policy.runtime import ObservationError, PolicyRuntime, stream_generator
from scd_policy.serve import ClientFleet, PolicyClient, ServerConnectionError, ServerError, protocol
from scd_policy.training.checkpoint import resolve_policy_dir

pytestmark = pytest.mark.slow
STATE_DIM = 6  # reach_around's state


def observations(steps: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"state": rng.uniform(-0.3, 0.3, STATE_DIM).astype(np.float32)} for _ in range(steps)]


def local(run: Path, seed: int) -> PolicyRuntime:
    return PolicyRuntime.from_pretrained(resolve_policy_dir(run), seed=seed, num_threads=1)


@pytest.fixture(scope="module")
def server(trained_run: Path) -> str:
    with serving(trained_run, "batch_window_ms=50") as (url, _):
        yield url


def test_one_session_equals_the_local_runtime_exactly(trained_run: Path, server: str) -> None:
    with PolicyClient(server) as client:
        meta = client.metadata
        assert meta["policy_type"] == "scd" and meta["task"] == TASK and meta["fps"] > 0
        assert meta["observations"] == {"state": {"shape": [STATE_DIM], "image": False}}
        assert (meta["action_dim"], meta["n_action_steps"], meta["num_inference_steps"]) == (2, 4, 3)
        for seed in (5, 6):  # two episodes on one session
            client.reset(seed=seed)
            runtime = local(trained_run, seed)
            for obs in observations(13, seed):
                np.testing.assert_array_equal(client.step(obs), runtime.step(obs))
        assert client.last_timing["batch"] == 1 and client.last_timing["round_trip_ms"] > 0


def test_concurrent_sessions_are_batched_and_each_gets_its_own_actions(
    trained_run: Path, server: str
) -> None:
    n, steps = 6, 12
    got: dict[int, list[np.ndarray]] = {}
    batches: list[int] = []
    barrier = threading.Barrier(n)

    def session(i: int) -> None:
        with PolicyClient(server) as client:
            client.reset(seed=100 + i)
            barrier.wait()
            got[i] = []
            for obs in observations(steps, i):
                got[i].append(client.step(obs))
                batches.append(int(client.last_timing["batch"]))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert max(batches) > 1  # the server did batch sessions together
    for i in range(n):
        runtime = local(trained_run, 100 + i)
        expected = np.stack([runtime.step(obs) for obs in observations(steps, i)])
        np.testing.assert_allclose(np.stack(got[i]), expected, atol=1e-6, rtol=0)


def test_bad_messages_get_an_error_reply_and_the_session_goes_on(trained_run: Path, server: str) -> None:
    good = observations(3, 0)
    runtime = local(trained_run, 0)
    with connect(server) as ws:
        assert msgpack.unpackb(ws.recv())["type"] == "hello"

        def ask(frame: bytes | str) -> dict[str, object]:
            ws.send(frame)
            reply = protocol.unpack(ws.recv())
            return reply

        array = {"__ndarray__": True, "dtype": "<f4", "shape": [STATE_DIM]}
        cases: list[tuple[bytes | str, str, str]] = [
            (b"\xc1\x00", "bad_message", "not valid msgpack"),
            ("hello", "bad_message", "text frame"),
            (msgpack.packb([1, 2]), "bad_message", 'string "type"'),
            (protocol.pack({"type": "fly"}), "bad_message", "unknown message type 'fly'"),
            (protocol.pack({"type": "step"}), "bad_message", '"obs"'),
            (protocol.pack({"type": "reset", "seed": -1}), "bad_message", "seed"),
            (
                msgpack.packb({"type": "step", "obs": {"state": {**array, "data": b"12"}}}),
                "bad_message",
                "needs 24 bytes",
            ),
            (
                msgpack.packb({"type": "step", "obs": {"state": {**array, "dtype": "|O", "data": b""}}}),
                "bad_message",
                "dtype",
            ),
            (
                protocol.pack({"type": "step", "obs": {"pos": good[0]["state"]}}),
                "bad_observation",
                "missing 'state'",
            ),
            (
                protocol.pack({"type": "step", "obs": {"state": np.zeros(4, np.float32)}}),
                "bad_observation",
                "expected (6,)",
            ),
            (
                protocol.pack({"type": "step", "obs": {"state": np.full(STATE_DIM, np.nan)}}),
                "bad_observation",
                "NaN",
            ),
            (protocol.pack({"type": "step", "obs": {"state": np.full(STATE_DIM, True)}}), "action", ""),
        ]
        runtime.step({"state": np.full(STATE_DIM, True)})  # the one valid (bool) step, mirrored locally
        for frame, code, fragment in cases:
            reply = ask(frame)
            if code == "action":
                assert reply["type"] == "action"
                continue
            assert reply == {"type": "error", "code": code, "message": reply["message"]}
            assert fragment in str(reply["message"]), reply
        for obs in good:  # the errors did not touch the session's state
            reply = ask(protocol.pack({"type": "step", "obs": obs}))
            np.testing.assert_array_equal(reply["action"], runtime.step(obs))


def test_a_latency_budget_is_served_like_the_local_runtime(trained_run: Path) -> None:
    # The server samples the chunks that latency_ticks leaves for later after sending the reply.
    with serving(trained_run, "latency_ticks=2", "seam=blend") as (url, _), PolicyClient(url) as client:
        assert (client.metadata["latency_ticks"], client.metadata["seam"]) == (2, "blend")
        client.reset(seed=4)
        runtime = PolicyRuntime.from_pretrained(
            resolve_policy_dir(trained_run), seed=4, num_threads=1, latency_ticks=2, seam="blend"
        )
        for obs in observations(15, 4):
            np.testing.assert_array_equal(client.step(obs), runtime.step(obs))


def test_a_zero_batch_window_still_batches_what_is_queued(trained_run: Path) -> None:
    # batch_window_ms=0 never waits, but a fleet's requests that queue while a tick computes join the
    # next one; every session still gets its own actions.
    n, steps = 6, 10
    with serving(trained_run, "batch_window_ms=0") as (url, _), ClientFleet(url, n, seed=3) as fleet:
        batches: list[int] = []
        got = []
        for t in range(steps):
            obs = {"state": np.stack([observations(steps, i)[t]["state"] for i in range(n)])}
            got.append(fleet.step(obs))
            batches += [int(client.last_timing["batch"]) for client in fleet.clients]
    assert max(batches) > 1
    runtime = PolicyRuntime.from_pretrained(
        resolve_policy_dir(trained_run), num_envs=n, seed=3, num_threads=1
    )
    for t in range(steps):
        obs = {"state": np.stack([observations(steps, i)[t]["state"] for i in range(n)])}
        np.testing.assert_allclose(got[t], runtime.step(obs), atol=1e-6, rtol=0)


def test_deferred_encoding_is_served_like_the_local_runtime(trained_run: Path) -> None:
    # defer_encoding: a fleet's ticks between replans only buffer each session's step; the replanning
    # tick encodes them with the batch. The actions are a local deferring runtime's.
    n, steps = 4, 13
    with (
        serving(trained_run, "defer_encoding=true") as (url, _),
        ClientFleet(url, n, seed=8) as fleet,
    ):
        assert fleet.metadata["defer_encoding"] is True
        runtime = PolicyRuntime.from_pretrained(
            resolve_policy_dir(trained_run), num_envs=n, seed=8, num_threads=1, defer_encoding=True
        )
        for t in range(steps):
            obs = {"state": np.stack([observations(steps, i)[t]["state"] for i in range(n)])}
            np.testing.assert_allclose(fleet.step(obs), runtime.step(obs), atol=1e-6, rtol=0)


def test_an_oversized_message_closes_that_connection_only(trained_run: Path) -> None:
    with serving(trained_run, "max_message_bytes=2048") as (url, _), PolicyClient(url) as client:
        with pytest.raises(ValueError, match="at most 2048"):  # refused before it is sent
            client.step({"state": np.zeros(1000, np.float32)})
        with connect(url) as ws:
            ws.recv()
            ws.send(protocol.pack({"type": "step", "obs": {"state": np.zeros(1000, np.float32)}}))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert client.step(observations(1, 0)[0]).shape == (2,)  # the other session is untouched


def test_a_full_server_refuses_then_admits_again(trained_run: Path) -> None:
    with serving(trained_run, "max_sessions=2") as (url, _):
        first, second = PolicyClient(url), PolicyClient(url)
        with pytest.raises(ServerError, match="server_full: the server is full \\(2 sessions\\)"):
            PolicyClient(url)
        first.close()
        _wait_for_sessions(url, 1)
        with PolicyClient(url) as third:
            assert third.step(observations(1, 0)[0]).shape == (2,)
        second.close()


def test_disconnects_free_their_sessions_and_memory_stays_flat(trained_run: Path, server: str) -> None:
    obs = observations(1, 0)[0]
    pid = _health(server)["pid"]

    def cycles(n: int) -> None:
        for _ in range(n):
            client = PolicyClient(server)
            client.step(obs)  # mid-episode: the session holds history when it goes
            client.close()

    cycles(100)
    _wait_for_sessions(server, 0)
    before = _rss_kib(pid)
    cycles(1000)
    _wait_for_sessions(server, 0)
    grown = _rss_kib(pid) - before
    assert grown < 8 * 1024, f"server RSS grew by {grown} KiB over 1000 sessions"


def test_a_server_restart_mid_episode_is_reported_and_recoverable(trained_run: Path) -> None:
    port = free_port()
    obs = observations(6, 1)
    with serving(trained_run, port=port) as (url, _):
        client = PolicyClient(url)
        client.reset(seed=3)
        client.step(obs[0])
    with pytest.raises(ServerConnectionError, match="reconnect\\(\\) and reset\\(\\)"):
        client.step(obs[1])
    with serving(trained_run, port=port) as (url, _):
        client.reconnect()
        client.reset(seed=3)
        runtime = local(trained_run, 3)
        for step_obs in obs:
            np.testing.assert_array_equal(client.step(step_obs), runtime.step(step_obs))
        client.close()


def test_token_health_check_and_idle_eviction(trained_run: Path) -> None:
    with serving(trained_run, "token=s3cret", "idle_timeout_s=1") as (url, _):
        with pytest.raises(ServerConnectionError, match="HTTP 401"):
            PolicyClient(url)
        with pytest.raises(ServerConnectionError, match="HTTP 401"):
            PolicyClient(url, token="wrong")
        assert _health(url)["status"] == "ok"  # no token needed for the health check
        client = PolicyClient(url, token="s3cret")
        assert client.step(observations(1, 0)[0]).shape == (2,)
        time.sleep(2.0)
        with pytest.raises(ServerConnectionError, match="code 4000: idle for 1 s"):
            client.step(observations(1, 0)[0])
        assert _health(url)["sessions"] == 0


def test_bad_checkpoint_or_option_is_one_line(trained_run: Path, tmp_path: Path) -> None:
    for args, fragment in (
        ([f"checkpoint={tmp_path}"], str(tmp_path)),
        (
            [f"checkpoint={trained_run}", "latency_ticks=7"],
            "latency_ticks=7 must be in [0, n_action_steps=4]",
        ),
    ):
        result = subprocess.run(
            [str(VENV_BIN / "scd-serve"), *args, "port=0"], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "scd-serve: error:" in result.stderr and fragment in result.stderr, result.stderr[-2000:]


def test_scd_eval_rolls_out_through_the_server(trained_run: Path, server: str, tmp_path: Path) -> None:
    out = tmp_path / "served.json"
    result = subprocess.run(
        [
            str(VENV_BIN / "scd-eval"),
            f"server={server}",
            "episodes=2",
            "seeds=[0]",
            "n_envs=2",
            "videos=0",
            f"out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["task"] == TASK and results["policy"] == "scd" and results["server"] == server
    assert len(results["per_seed"]) == 1 and 0.0 <= results["success_rate"] <= 1.0
    assert results["mean_episode_length"] > 0 and results["latency_batch"] == 2
    with ClientFleet(server, 2, seed=0) as fleet:  # a fleet mirrors a local 2-stream runtime
        runtime = PolicyRuntime.from_pretrained(resolve_policy_dir(trained_run), num_envs=2, seed=0)
        for obs in observations(5, 9):
            batch = {"state": np.stack([obs["state"], -obs["state"]])}
            np.testing.assert_allclose(fleet.step(batch), runtime.step(batch), atol=1e-6, rtol=0)


def test_a_fleet_tick_with_one_bad_observation_raises_and_every_session_stays_in_step(
    trained_run: Path, server: str
) -> None:
    # A fleet sends every request before reading any reply; after one session's error it must still
    # read the others', or the next tick would read this tick's replies.
    with ClientFleet(server, 2, seed=0) as fleet:
        sessions = [local(trained_run, 0), local(trained_run, 0)]  # streams 0 and 1 of seed 0
        sessions[1].generators[0].set_state(stream_generator(0, 1).get_state())
        for tick, obs in enumerate(observations(6, 4)):
            rows = [obs["state"], -obs["state"]]
            if tick == 2:
                with pytest.raises(ObservationError, match="state"):
                    fleet.step({"state": np.stack([np.full_like(rows[0], np.nan), rows[1]])})
                sessions[1].step({"state": rows[1]})  # session 1 was served that tick, session 0 not
                continue
            expected = np.stack(
                [runtime.step({"state": row}) for runtime, row in zip(sessions, rows, strict=True)]
            )
            np.testing.assert_allclose(fleet.step({"state": np.stack(rows)}), expected, atol=1e-6, rtol=0)


def test_backend_onnx_serves_and_rolls_out_like_torch(trained_run: Path, tmp_path: Path) -> None:
    # scd-serve backend=onnx exports the policy once (into <policy>/onnx) and serves the actions the
    # local torch runtime computes, to float32 rounding; scd-eval backend=onnx rolls out with that export.
    with serving(trained_run, "backend=onnx") as (url, _), PolicyClient(url) as client:
        client.reset(seed=3)
        runtime = local(trained_run, 3)
        for obs in observations(13, 3):
            np.testing.assert_allclose(client.step(obs), runtime.step(obs), rtol=0, atol=1e-4)
    assert (resolve_policy_dir(trained_run) / "onnx" / "manifest.json").is_file()
    out = tmp_path / "onnx.json"
    result = subprocess.run(
        [
            str(VENV_BIN / "scd-eval"),
            f"checkpoint={trained_run}",
            "backend=onnx",
            "threads=1",
            "episodes=2",
            "seeds=[0]",
            "n_envs=1",
            "videos=0",
            f"out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["backend"] == "onnx" and results["task"] == TASK and results["mean_episode_length"] > 0


# ----------------------------------------------------------------------------- helpers


def _health(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url.replace("ws://", "http://") + "/healthz", timeout=10) as response:
        assert response.status == 200
        body: dict[str, object] = json.loads(response.read())
        return body


def _wait_for_sessions(url: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while _health(url)["sessions"] != count:
        assert time.monotonic() < deadline, f"sessions did not come down to {count}"
        time.sleep(0.05)


def _rss_kib(pid: object) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_protocol_round_trip_and_refusals() -> None:
    message = {"type": "step", "obs": {"a": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.uint8(7)}}
    back = protocol.unpack(protocol.pack(message))
    np.testing.assert_array_equal(back["obs"]["a"], message["obs"]["a"])
    assert back["obs"]["a"].dtype == np.float64 and back["obs"]["a"].flags.writeable and back["obs"]["b"] == 7
    with pytest.raises(TypeError, match="numeric arrays only"):
        protocol.pack({"type": "step", "obs": {"a": np.array(["x"])}})
    with pytest.raises(protocol.ProtocolError, match="little-endian"):
        protocol.unpack(
            msgpack.packb(
                {"type": "x", "a": {"__ndarray__": True, "dtype": ">f4", "shape": [1], "data": b"1234"}}
            )
        )
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{free_port()}/healthz", timeout=2)
