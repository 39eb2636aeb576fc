"""The wire protocol of ``scd-serve``: msgpack messages over a websocket, numpy arrays without pickle.

Every message is one binary websocket frame holding a msgpack map with a ``"type"`` key.

Client -> server:

- ``{"type": "reset", "seed": int | None, "stream": int}``: start a new episode (``stream`` picks the
  noise stream ``stream_generator(seed, stream)``, so session i of a fleet can mirror stream i of a
  local ``PolicyRuntime(num_envs=n)``). Reply ``{"type": "reset"}``.
- ``{"type": "step", "obs": {key: array}}``: one control tick. Reply ``{"type": "action", "action":
  array (Da,), "timing": {"queue_ms", "compute_ms", "server_ms", "batch"}}`` (ms inside the server).

Server -> client: first ``{"type": "hello", "protocol": PROTOCOL_VERSION, "metadata": {...}}`` (see
``PolicyServer.metadata``), then one reply per request, in order. A request that cannot be served gets
``{"type": "error", "code": ..., "message": ...}`` and the session stays usable, except where the code
says the connection closes (``server_full``).

Arrays are maps ``{"__ndarray__": true, "dtype": "<f4", "shape": [...], "data": bytes}`` (little-endian
numeric dtypes only). ``PROTOCOL_VERSION`` changes whenever a message changes incompatibly; a client
refuses a server of another version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

PROTOCOL_VERSION = 1

# Error codes of {"type": "error"} replies.
BAD_MESSAGE = "bad_message"  # not msgpack, not a map, unknown type, a field of the wrong kind
BAD_OBSERVATION = "bad_observation"  # keys, shapes, dtypes, NaN/inf, absurd values (the runtime's check)
POLICY_OUTPUT = "policy_output"  # the policy produced NaN/inf: that session was reset
SERVER_FULL = "server_full"  # max_sessions reached: the connection is closed (code 1013, try again later)

# Websocket close codes the server uses besides the standard ones (1009: message too big).
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_IDLE = 4000  # the session sent nothing for idle_timeout_s

_ARRAY_TAG = "__ndarray__"
_DTYPE_KINDS = "biuf"  # bool, signed and unsigned integers, floats
_MAX_DIMS = 8


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the text says what was expected)."""


def _encode_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _DTYPE_KINDS:
            raise TypeError(f"cannot send an array of dtype {value.dtype}: numeric arrays only")
        array = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        return {
            _ARRAY_TAG: True,
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "data": array.tobytes(),
        }
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot send a {type(value).__name__}")


def _decode_hook(value: dict[Any, Any]) -> Any:
    if value.get(_ARRAY_TAG) is not True:
        return value
    dtype_text, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
    if not isinstance(dtype_text, str) or not isinstance(shape, list) or not isinstance(data, bytes):
        raise ProtocolError("an array needs 'dtype' (str), 'shape' (list of ints) and 'data' (bytes)")
    try:
        dtype = np.dtype(dtype_text)
    except TypeError:
        raise ProtocolError(f"array dtype {dtype_text!r} is not a numpy dtype") from None
    if dtype.kind not in _DTYPE_KINDS or dtype.byteorder == ">":
        raise ProtocolError(f"array dtype {dtype_text!r}: expected a little-endian bool/int/uint/float")
    if len(shape) > _MAX_DIMS or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ProtocolError(f"array shape {shape}: expected at most {_MAX_DIMS} non-negative ints")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ProtocolError(
            f"array of dtype {dtype_text} and shape {shape} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, owning its memory


def pack(message: Mapping[str, Any]) -> bytes:
    """One message as the bytes of a websocket frame."""
    return msgpack.packb(message, default=_encode_default, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(frame: bytes | str) -> dict[str, Any]:
    """A received frame as a message map; ``ProtocolError`` if it is not one."""
    if isinstance(frame, str):
        raise ProtocolError("expected a binary frame holding msgpack, got a text frame")
    try:
        message = msgpack.unpackb(frame, object_hook=_decode_hook, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise ProtocolError(f"the frame is not valid msgpack ({type(error).__name__}: {error})") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError('a message is a msgpack map with a string "type"')
    return message


def observation(message: Mapping[str, Any]) -> dict[str, npt.ArrayLike]:
    """The ``obs`` map of a step message (values arrays or nested lists of numbers)."""
    obs = message.get("obs")
    if not isinstance(obs, dict) or not obs or not all(isinstance(key, str) for key in obs):
        raise ProtocolError('a step message needs "obs": a non-empty map from observation key to array')
    return obs


def error(code: str, message: str) -> dict[str, str]:
    return {"type": "error", "code": code, "message": message}
