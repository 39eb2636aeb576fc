"""``scd-serve``'s server: one policy, many client sessions, each with its streaming state kept here.

A session per websocket connection owns a slot: a single-stream ``PolicyRuntime`` (the KV cache or
observation window, the action queue, the previous action, the noise generator), so a client sends only
its new observation each tick. Slots are made on first use and reused, so memory stays flat however
many clients come and go.

Batching across sessions: requests wait in one queue; the batcher takes the first and every request
already queued, then collects more for up to ``batch_window_ms`` (or until every session of the last
two ticks has a request in), and runs them as one tick of ``step_sessions``: one encoder call and one
decoder run for all of them, on a single worker thread (the event loop keeps reading and writing
sockets meanwhile). Each session gets the actions it would get alone (``step_sessions``), and a bad
request fails only its own reply. With a
latency budget (``latency_ticks`` > 0) the chunks a tick plans for later ticks are sampled after its
replies are sent, so a client's round trip on a replanning tick costs the encoder only.

Limits: ``max_sessions`` (one more is told ``server_full`` and closed with 1013), ``max_message_bytes``
(a bigger frame closes the connection with 1009, the websocket "message too big"), ``idle_timeout_s``
(close code 4000), an optional shared ``token`` (``Authorization: Bearer <token>``; HTTP 401 otherwise),
``GET /healthz`` (200 with the policy type and session count).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import numpy as np
import numpy.typing as npt
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from scd_policy.conventions import is_policy_image
from scd_policy.policies import Policy
from scd_policy.runtime import (
    ObservationError,
    PolicyOutputError,
    PolicyRuntime,
    plan_sessions,
    step_sessions_deferred,
    stream_generator,
)
from scd_policy.serve import protocol

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """How the server runs the policy and what it allows (``scd-serve --help`` lists them)."""

    host: str = "127.0.0.1"  # loopback by default: serving to a network is a choice
    port: int = 8765  # 0: any free port (the bound one is logged and in PolicyServer.port)
    max_sessions: int = 64
    max_message_bytes: int = 8 * 1024 * 1024
    idle_timeout_s: float = 300.0  # a session silent this long is closed and its slot freed
    token: str | None = None  # shared secret; clients send "Authorization: Bearer <token>"
    # How long a tick waits for the requests of the sessions that ticked lately (a lockstep fleet's
    # requests arrive spread over a few ms); it stops waiting as soon as they are all in. Requests
    # already queued always join the tick, so 0 batches only what is waiting: the choice for robots
    # that tick on their own clocks, where waiting for a neighbour is pure latency.
    batch_window_ms: float = 5.0
    batching: bool = True  # False: every request is its own tick (the unbatched baseline)
    seed: int = 0  # a new session's noise seed until it resets with its own
    n_action_steps: int | None = None  # runtime options for every session (default: the policy's)
    num_inference_steps: int | None = None
    replan_every_step: bool = False
    context_window: int | None = None
    # Execution schedule of every session (scd_policy.execution): the latency budget in ticks and the
    # seam between chunks.
    latency_ticks: int = 0
    seam: str = "switch"
    # Open loop, causal policies: a tick at which a session plans nothing only buffers its step, and its
    # next replan encodes the buffered steps in one call with the other sessions replanning then (the
    # same actions to float32 rounding; ticks between replans then cost almost nothing).
    defer_encoding: bool = False


@dataclass
class _Request:
    runtime: PolicyRuntime
    obs: dict[str, Any]
    arrived: float
    reply: asyncio.Future[dict[str, Any]] = field(repr=False)


class PolicyServer:
    """Serve ``policy`` to websocket clients (``scd_policy.serve.PolicyClient``); see the module doc."""

    def __init__(
        self,
        policy: Policy,
        options: ServeOptions | None = None,
        *,
        task: str | None = None,
        camera: str | None = None,
        cameras: dict[str, str] | None = None,
        task_module: str | None = None,
    ) -> None:
        self.policy = policy.eval()
        self.options = options or ServeOptions()
        if self.options.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.options.max_sessions}")
        # What the policy was trained on, told to clients: the task (and the module registering it), the
        # camera of `image` and those of further image keys.
        self.task, self.task_module, self.camera = task, task_module, camera
        self.cameras = dict(cameras or {})
        self._free: list[PolicyRuntime] = []  # reusable slots
        self._next_session = 0
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scd-serve-policy")
        self._server: Server | None = None
        self.ticks = 0  # batched ticks run (for the benchmark and the logs)
        self._connected: set[int] = set()  # id() of the runtimes of open sessions
        # The sessions of the last two ticks: who a tick waits for. A lockstep fleet is in every tick,
        # a straggler that missed one is waited for in the next, and a session that stopped stepping
        # (connected but idle) stops holding ticks back after two of them.
        self._recent: deque[set[int]] = deque(maxlen=2)
        probe = self._new_runtime()
        self._free.append(probe)
        self.metadata = self._describe(probe)

    # ------------------------------------------------------------------ set-up

    def _new_runtime(self) -> PolicyRuntime:
        o = self.options
        return PolicyRuntime(
            self.policy,
            n_action_steps=o.n_action_steps,
            num_inference_steps=o.num_inference_steps,
            replan_every_step=o.replan_every_step,
            seed=o.seed,
            context_window=o.context_window,
            latency_ticks=o.latency_ticks,
            seam=o.seam,
            defer_encoding=o.defer_encoding,
        )

    def _describe(self, runtime: PolicyRuntime) -> dict[str, Any]:
        cfg = self.policy.config
        return {
            "policy_type": cfg.type,
            "task": self.task,
            "task_module": self.task_module,
            "camera": self.camera,
            "cameras": self.cameras,
            "observations": {
                key: {"shape": list(shape), "image": is_policy_image(shape)}
                for key, shape in cfg.input_shapes.items()
            },
            "action_dim": cfg.action_dim,
            "fps": _task_fps(self.task),
            "horizon": cfg.horizon,
            "chunk_len": runtime.chunk_len,
            "n_action_steps": runtime.n_action_steps,
            "num_inference_steps": runtime.num_inference_steps,
            "replan_every_step": runtime.replan_every_step,
            "latency_ticks": runtime.latency_ticks,
            "seam": self.options.seam,
            "defer_encoding": runtime.defer_encoding,
            "max_message_bytes": self.options.max_message_bytes,
            "max_sessions": self.options.max_sessions,
        }

    @property
    def sessions(self) -> int:
        """Connected sessions now."""
        return len(self._connected)

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    # ------------------------------------------------------------------ running

    async def start(self) -> None:
        """Bind and start accepting connections (returns once listening)."""
        self._queue = asyncio.Queue()
        self._batcher = asyncio.create_task(self._run_batches())
        o = self.options
        self._server = await serve(
            self._session,
            o.host,
            o.port,
            max_size=o.max_message_bytes,
            process_request=self._check_request,
            compression=None,  # observations are mostly incompressible floats; deflate costs latency
        )
        log.info(
            "serving %s on ws://%s:%d (max %d sessions, batching %s)",
            self.policy.config.type,
            o.host,
            self.port,
            o.max_sessions,
            f"within {o.batch_window_ms:g} ms" if o.batching else "off",
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._batcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._batcher
        self._worker.shutdown(wait=True)

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.stop()

    # ------------------------------------------------------------------ HTTP: health and auth

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] == "/healthz":
            body = {
                "status": "ok",
                "policy_type": self.policy.config.type,
                "sessions": self.sessions,
                "pid": os.getpid(),
            }
            return _respond(HTTPStatus.OK, json.dumps(body) + "\n", "application/json")
        token = self.options.token
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return _respond(
                HTTPStatus.UNAUTHORIZED, "a valid 'Authorization: Bearer <token>' header is required\n"
            )
        return None

    # ------------------------------------------------------------------ one session

    async def _session(self, connection: ServerConnection) -> None:
        if self.sessions >= self.options.max_sessions:
            message = f"the server is full ({self.options.max_sessions} sessions); try again later"
            with contextlib.suppress(ConnectionClosed):
                await connection.send(protocol.pack(protocol.error(protocol.SERVER_FULL, message)))
                await connection.close(protocol.CLOSE_TRY_AGAIN_LATER, "server full")
            return
        runtime = self._free.pop() if self._free else self._new_runtime()
        self._connected.add(id(runtime))
        session = self._next_session
        self._next_session += 1
        self._start_episode(runtime, self.options.seed, 0)
        log.info("session %d connected from %s (%d open)", session, connection.remote_address, self.sessions)
        try:
            await connection.send(
                protocol.pack(
                    {
                        "type": "hello",
                        "protocol": protocol.PROTOCOL_VERSION,
                        "session": session,
                        "metadata": self.metadata,
                    }
                )
            )
            while True:
                try:
                    frame = await asyncio.wait_for(connection.recv(), self.options.idle_timeout_s)
                except TimeoutError:
                    await connection.close(protocol.CLOSE_IDLE, f"idle for {self.options.idle_timeout_s:g} s")
                    return
                await connection.send(protocol.pack(await self._answer(runtime, frame)))
        except ConnectionClosed:
            pass
        finally:
            self._connected.discard(id(runtime))
            self._free.append(runtime)
            log.info("session %d closed (%d open)", session, self.sessions)

    async def _answer(self, runtime: PolicyRuntime, frame: bytes | str) -> dict[str, Any]:
        try:
            message = protocol.unpack(frame)
            kind = message["type"]
            if kind == "step":
                return await self._step(runtime, protocol.observation(message))
            if kind == "reset":
                seed, stream = message.get("seed"), message.get("stream", 0)
                if seed is not None and (not isinstance(seed, int) or seed < 0):
                    raise protocol.ProtocolError(
                        f"reset seed must be a non-negative int or null, got {seed!r}"
                    )
                if not isinstance(stream, int) or stream < 0:
                    raise protocol.ProtocolError(f"reset stream must be a non-negative int, got {stream!r}")
                self._start_episode(runtime, seed, stream)
                return {"type": "reset"}
            raise protocol.ProtocolError(f'unknown message type {kind!r}; expected "step" or "reset"')
        except protocol.ProtocolError as error:
            return protocol.error(protocol.BAD_MESSAGE, str(error))

    def _start_episode(self, runtime: PolicyRuntime, seed: int | None, stream: int) -> None:
        runtime.reset()
        if seed is not None:  # as a local runtime's reset(seed=...) would seed its stream `stream`
            runtime.generators[0].set_state(stream_generator(seed, stream).get_state())

    async def _step(self, runtime: PolicyRuntime, obs: dict[str, Any]) -> dict[str, Any]:
        assert self._queue is not None
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(runtime, obs, time.perf_counter(), reply))
        return await reply

    # ------------------------------------------------------------------ the batcher

    def _expected_batch(self) -> int:
        recent = set().union(*self._recent) & self._connected
        return max(len(recent), 1)

    async def _run_batches(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            if self.options.batching:
                deadline = loop.time() + self.options.batch_window_ms / 1000.0
                expected = self._expected_batch()
                while True:
                    # Requests already waiting join at no cost in latency (also with a zero window).
                    while not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                    if len(batch) >= expected:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), deadline - loop.time()))
                    except TimeoutError:
                        break
            started = time.perf_counter()
            results, deferred = await loop.run_in_executor(
                self._worker, step_sessions_deferred, [r.runtime for r in batch], [r.obs for r in batch]
            )
            done = time.perf_counter()
            self.ticks += 1
            self._recent.append({id(r.runtime) for r in batch})
            for request, result in zip(batch, results, strict=True):
                timing = {
                    "queue_ms": 1000.0 * (started - request.arrived),
                    "compute_ms": 1000.0 * (done - started),
                    "server_ms": 1000.0 * (done - request.arrived),
                    "batch": len(batch),
                }
                if not request.reply.done():
                    request.reply.set_result(_reply(result, timing))
            if deferred:  # chunks a latency budget uses later: planned while the replies go out
                await loop.run_in_executor(self._worker, plan_sessions, deferred)


def _reply(
    result: npt.NDArray[np.float32] | ObservationError | PolicyOutputError, timing: dict[str, float]
) -> dict[str, Any]:
    if isinstance(result, ObservationError):
        return protocol.error(protocol.BAD_OBSERVATION, str(result))
    if isinstance(result, PolicyOutputError):
        return protocol.error(protocol.POLICY_OUTPUT, str(result))
    return {"type": "action", "action": result.reshape(-1), "timing": timing}


def _respond(status: HTTPStatus, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    data = body.encode()
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return Response(status.value, status.phrase, headers, data)


def _task_fps(task: str | None) -> float | None:
    """The control rate of the task the policy was trained on, when it is known here."""
    if not task:
        return None
    from envs.registry import get_task, task_names

    return float(get_task(task).fps) if task in task_names() else None


@dataclass
class ServeConfig(ServeOptions):
    """``scd-serve``'s configuration: the checkpoint and where to run it, plus the server's options."""

    checkpoint: str = ""  # a run folder, a checkpoints/step_* folder, or a policy folder
    device: str = "cpu"
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    backend: str = "torch"  # torch, onnx or compile (scd only for the last two; scd_policy.backends)


def run_server(cfg: ServeConfig) -> None:
    """``scd-serve``'s work: load the policy and serve it until interrupted (Ctrl-C / SIGTERM)."""
    import dataclasses
    from pathlib import Path

    import torch

    from scd_policy.backends import attach_backend
    from scd_policy.config import ConfigError
    from scd_policy.evaluation import run_config_for
    from scd_policy.policies import load_policy
    from scd_policy.training.checkpoint import resolve_policy_dir

    if not cfg.checkpoint:
        raise ConfigError("scd-serve needs checkpoint=<run folder or policy folder>")
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    policy_dir = resolve_policy_dir(Path(cfg.checkpoint))
    policy = attach_backend(load_policy(policy_dir, device=cfg.device), cfg.backend, checkpoint=policy_dir)
    run_cfg = run_config_for(policy_dir)
    task = str(run_cfg.get("task") or "") or None
    camera = str(run_cfg.get("camera") or "") or None
    cameras = run_cfg.get("cameras")
    task_module = str(run_cfg.get("task_module") or "") or None
    options = ServeOptions(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ServeOptions)})
    try:
        server = PolicyServer(
            policy,
            options,
            task=task,
            camera=camera,
            cameras=cameras if isinstance(cameras, dict) else None,
            task_module=task_module,
        )
    except ValueError as error:  # a runtime option that does not fit this policy (n_action_steps, ...)
        raise ConfigError(f"{error} (for the policy in {policy_dir})") from None
    log.info(
        "loaded %s (%s, backend %s, task %s)", policy_dir, policy.config.type, cfg.backend, task or "unknown"
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(server.serve_forever())
