"""``PolicyClient``: the deployment API (``reset`` / ``step``) of a policy served by ``scd-serve``.

It behaves like a local single-stream ``PolicyRuntime`` of the same checkpoint: the same seed gives the
same actions, a bad observation raises ``ObservationError`` with the server's explanation, a non-finite
policy output ``PolicyOutputError``. The streaming state lives on the server, so each ``step`` sends
only the new observation. ``metadata`` is what the server said on connect (policy type, observation
keys and shapes, action dim, fps, chunk settings); ``last_timing`` the server's timing of the last reply
plus the measured round trip.

If the server goes away (restart, crash, network), the next call raises ``ServerConnectionError``: the
episode's state was on the server and is gone; ``reconnect()`` and ``reset()`` start a new episode.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from scd_policy.runtime import ObservationError, PolicyOutputError
from scd_policy.serve import protocol


class ServerError(RuntimeError):
    """The server refused a request or the session (``code`` is one of the protocol's error codes)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class ServerConnectionError(ConnectionError):
    """No connection to the server (refused, lost, closed by it, or not the right protocol)."""


class PolicyClient:
    """A session with an ``scd-serve`` server; ``url`` like ``ws://127.0.0.1:8765``."""

    def __init__(
        self, url: str, *, token: str | None = None, timeout_s: float = 30.0, open_timeout_s: float = 10.0
    ) -> None:
        self.url = url
        self.token = token
        self.timeout_s = timeout_s
        self.open_timeout_s = open_timeout_s
        self.metadata: dict[str, Any] = {}
        self.session: int | None = None
        self.last_timing: dict[str, float] = {}
        self._connection: ClientConnection | None = None
        self._exit = contextlib.ExitStack()
        self.reconnect()

    # ------------------------------------------------------------------ connection

    def reconnect(self) -> None:
        """(Re)open the session; the server starts it with fresh state (call ``reset`` to seed it)."""
        self.close()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token is not None else None
        try:
            # Entered as a context manager (websockets' supported form), closed by close().
            self._connection = self._exit.enter_context(
                connect(
                    self.url,
                    additional_headers=headers,
                    open_timeout=self.open_timeout_s,
                    max_size=None,  # the server's replies are small; its own limit is in metadata
                    compression=None,
                )
            )
        except InvalidStatus as error:
            status = error.response.status_code
            body = error.response.body.decode(errors="replace").strip() if error.response.body else ""
            raise ServerConnectionError(
                f"{self.url} refused the connection (HTTP {status}): {body}"
            ) from None
        except (OSError, TimeoutError, WebSocketException) as error:
            raise ServerConnectionError(f"cannot connect to {self.url}: {error}") from None
        hello = self._receive()
        if hello.get("type") == "error":
            self.close()
            raise ServerError(str(hello.get("code")), str(hello.get("message")))
        if hello.get("type") != "hello" or hello.get("protocol") != protocol.PROTOCOL_VERSION:
            self.close()
            raise ServerConnectionError(
                f"{self.url} speaks protocol {hello.get('protocol')!r}; this client speaks "
                f"{protocol.PROTOCOL_VERSION} (install the same scd-policy version on both sides)"
            )
        self.metadata = dict(hello["metadata"])
        self.session = int(hello["session"])

    def close(self) -> None:
        self._connection = None
        self._exit.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the deployment API

    def reset(self, seed: int | None = None, *, stream: int = 0) -> None:
        """Start a new episode; ``seed`` re-seeds the noise as a local ``PolicyRuntime.reset(seed=...)``
        would (stream ``stream`` of that seed: ``stream_generator(seed, stream)``)."""
        self.receive_reset(self.send_reset(seed, stream=stream))

    def send_reset(self, seed: int | None = None, *, stream: int = 0) -> float:
        """The first half of ``reset`` (see ``send_step``)."""
        return self._send({"type": "reset", "seed": seed, "stream": stream})

    def receive_reset(self, sent: float) -> None:
        """The second half of ``reset``."""
        self._reply(sent)

    def step(self, obs: Mapping[str, Any]) -> npt.NDArray[np.float32]:
        """One control tick: the raw observation (a dict of arrays, as for ``PolicyRuntime.step``) ->
        the action (Da,) in raw units."""
        return self.receive_action(self.send_step(obs))

    def send_step(self, obs: Mapping[str, Any]) -> float:
        """The first half of ``step``: send the observation, return when it went out (for
        ``receive_action``). Several sessions can send before any of them waits, so that one thread
        drives a fleet and the server sees the requests together."""
        return self._send({"type": "step", "obs": {key: np.asarray(value) for key, value in obs.items()}})

    def receive_action(self, sent: float) -> npt.NDArray[np.float32]:
        """The second half of ``step``: wait for the reply to the observation sent at ``sent``."""
        action = self._reply(sent).get("action")
        if not isinstance(action, np.ndarray):
            raise ServerConnectionError(f"{self.url} sent a step reply without an action array")
        return action.astype(np.float32, copy=False)

    # ------------------------------------------------------------------ internals

    def _send(self, message: dict[str, Any]) -> float:
        frame = protocol.pack(message)
        limit = self.metadata.get("max_message_bytes")
        if isinstance(limit, int) and len(frame) > limit:
            raise ValueError(
                f"this message is {len(frame)} bytes; the server accepts at most {limit} "
                "(scd-serve max_message_bytes=...)"
            )
        if self._connection is None:
            raise ServerConnectionError(f"not connected to {self.url}; call reconnect()")
        start = time.perf_counter()
        try:
            self._connection.send(frame)
        except ConnectionClosed as error:
            raise self._lost(error) from None
        return start

    def _reply(self, sent: float) -> dict[str, Any]:
        reply = self._receive()
        self.last_timing = {
            **reply.get("timing", {}),
            "round_trip_ms": 1000.0 * (time.perf_counter() - sent),
        }
        if reply.get("type") == "error":
            code, text = str(reply.get("code")), str(reply.get("message"))
            if code == protocol.BAD_OBSERVATION:
                raise ObservationError(text)
            if code == protocol.POLICY_OUTPUT:
                raise PolicyOutputError(text)
            raise ServerError(code, text)
        return reply

    def _receive(self) -> dict[str, Any]:
        assert self._connection is not None
        try:
            frame = self._connection.recv(timeout=self.timeout_s)
        except TimeoutError:
            raise ServerConnectionError(f"{self.url} did not answer within {self.timeout_s:g} s") from None
        except ConnectionClosed as error:
            raise self._lost(error) from None
        return protocol.unpack(frame)

    def _lost(self, error: ConnectionClosed) -> ServerConnectionError:
        self.close()
        close = error.rcvd
        why = f"code {close.code}: {close.reason}" if close is not None else "no close frame: it went away"
        if close is not None and close.code == 1009:
            why += f" (the message exceeded max_message_bytes={self.metadata.get('max_message_bytes')})"
        return ServerConnectionError(
            f"the connection to {self.url} was closed ({why}); the episode's state on the server is lost: "
            "reconnect() and reset() to start a new one"
        )


class ClientFleet:
    """``num_envs`` sessions of one server stepped together, with ``PolicyRuntime(num_envs=n)``'s
    ``reset(mask, seed)`` / ``step(obs)`` (observations with a leading ``num_envs`` axis): what
    ``scd-eval server=...`` rolls out through. Session i draws noise from stream i of the seed, like
    stream i of a local runtime. The sessions' requests go out together, so the server batches them."""

    def __init__(self, url: str, num_envs: int, *, seed: int = 0, token: str | None = None) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.clients: list[PolicyClient] = []
        try:
            for _ in range(num_envs):
                self.clients.append(PolicyClient(url, token=token))
        except BaseException:
            self.close()
            raise
        self.num_envs = num_envs
        self.metadata = self.clients[0].metadata
        self.num_inference_steps = int(self.metadata["num_inference_steps"])
        self.latencies_ms: deque[float] = deque(maxlen=10_000)  # per tick, all sessions' round trips
        self.reset(seed=seed)

    def reset(self, mask: Any = None, seed: int | None = None) -> None:
        chosen = range(self.num_envs) if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool))
        sent = [(self.clients[i], self.clients[i].send_reset(seed, stream=int(i))) for i in chosen]
        _gather(sent, PolicyClient.receive_reset)

    def step(self, obs: Mapping[str, Any]) -> npt.NDArray[np.float32]:
        start = time.perf_counter()
        arrays = {key: np.asarray(value) for key, value in obs.items()}
        sent = [
            (client, client.send_step({key: value[i] for key, value in arrays.items()}))
            for i, client in enumerate(self.clients)
        ]
        try:
            actions = _gather(sent, PolicyClient.receive_action)
        finally:
            self.latencies_ms.append(1000.0 * (time.perf_counter() - start))
        return np.stack(actions)

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> ClientFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_Reply = TypeVar("_Reply")


def _gather(
    sent: list[tuple[PolicyClient, float]], receive: Callable[[PolicyClient, float], _Reply]
) -> list[_Reply]:
    """Read the reply of every request in ``sent`` (client, when it was sent), in order. A fleet sends
    all its requests before it reads any (from one thread: the server answers them in one batched tick
    while the replies wait in the connections), and reads every reply even after one is an error, so
    that each session stays in step with its server side; the first error is raised after that."""
    replies: list[_Reply] = []
    failure: Exception | None = None
    for client, when in sent:
        try:
            replies.append(receive(client, when))
        except (ObservationError, PolicyOutputError, ServerError) as error:
            failure = failure or error
    if failure is not None:
        raise failure
    return replies
