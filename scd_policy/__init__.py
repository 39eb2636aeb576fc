"""scd-policy: Separable Causal Diffusion policies for robot learning.

``PolicyRuntime`` is the deployment API for any trained policy — scd, causal_diffusion or
diffusion_policy (``from_pretrained``, ``reset``, ``step``). ``SCDPolicy`` is the same class under the
name earlier releases used (kept for users' code; the SCD model itself is
``scd_policy.policies.SeparableCausalDiffusionPolicy``). Both are imported lazily so that
``import scd_policy`` stays cheap for tools that only need the data layer or the config schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["PolicyRuntime", "SCDPolicy", "__version__"]

if TYPE_CHECKING:
    from scd_policy.runtime import PolicyRuntime
    from scd_policy.runtime import PolicyRuntime as SCDPolicy


def __getattr__(name: str) -> Any:
    if name in ("PolicyRuntime", "SCDPolicy"):
        from scd_policy.runtime import PolicyRuntime

        return PolicyRuntime
    raise AttributeError(f"module 'scd_policy' has no attribute {name!r}")
