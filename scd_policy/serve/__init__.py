"""``scd-serve``: a stateful policy server and its client (see docs/deployment.md).

- ``PolicyServer`` (``server.py``): sessions with their streaming state on the server, batched across
  sessions; ``ServeOptions`` its limits.
- ``PolicyClient`` (``client.py``): ``reset`` / ``step`` over the wire, like a local ``PolicyRuntime``.
- ``protocol.py``: the messages (msgpack, numpy arrays without pickle) and error codes.
"""

from scd_policy.serve.client import ClientFleet, PolicyClient, ServerConnectionError, ServerError
from scd_policy.serve.protocol import PROTOCOL_VERSION
from scd_policy.serve.server import PolicyServer, ServeOptions

__all__ = [
    "PROTOCOL_VERSION",
    "ClientFleet",
    "PolicyClient",
    "PolicyServer",
    "ServeOptions",
    "ServerConnectionError",
    "ServerError",
]
