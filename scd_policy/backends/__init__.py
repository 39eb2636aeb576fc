"""Inference backends: what runs a policy's run-time calls.

``backend="torch"`` (the default) is the policies' own code. For ``scd`` two more run its encoder step
and decoder call (``backends.engine.StepEngine``) with the library's KV cache, sampler and streaming
semantics unchanged:

- ``"onnx"``: exported graphs run by ONNX Runtime (``backends.onnx``; the ``onnx`` extra), outputs equal
  to torch's within 1e-4 (tested over streamed episodes);
- ``"compile"``: the same graphs through ``torch.compile`` (the first calls include compilation).

``attach_backend(policy, backend)`` switches a loaded policy; ``PolicyRuntime.from_pretrained(...,
backend=...)``, ``scd-eval backend=...`` and ``scd-serve backend=...`` do it for you.
"""

from __future__ import annotations

from pathlib import Path

from scd_policy.backends.errors import BackendError
from scd_policy.policies.base import Policy

BACKENDS = ("torch", "onnx", "compile")

__all__ = ["BACKENDS", "BackendError", "attach_backend"]


def attach_backend(
    policy: Policy, backend: str, *, checkpoint: str | Path | None = None, threads: int | None = None
) -> Policy:
    """Run ``policy``'s inference calls on ``backend`` (see the module docstring); returns the policy.

    ``checkpoint``: the folder the policy was loaded from, where an ONNX export is kept and reused
    (``<checkpoint>/onnx``). ``threads``: ONNX Runtime's intra-op threads (default: torch's)."""
    from scd_policy.policies.scd import SeparableCausalDiffusionPolicy

    if backend not in BACKENDS:
        raise BackendError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend == "torch":
        if isinstance(policy, SeparableCausalDiffusionPolicy):
            policy.engine = None
        return policy
    if not isinstance(policy, SeparableCausalDiffusionPolicy):
        raise BackendError(
            f"backend={backend!r} runs 'scd' policies; this one is {policy.policy_type!r} (use backend=torch)"
        )
    if next(policy.parameters()).device.type != "cpu":
        raise BackendError(
            f"backend={backend!r} runs on the CPU; this policy is on {next(policy.parameters()).device}"
        )
    policy.eval()
    if backend == "onnx":
        from scd_policy.backends.onnx import onnx_engine

        policy.engine = onnx_engine(policy, checkpoint, threads=threads)
    else:
        from scd_policy.backends.engine import TorchGraphEngine

        policy.engine = TorchGraphEngine(policy, compile=True)
    return policy
