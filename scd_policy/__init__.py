"""scd-policy: Separable Causal Diffusion policies for robot learning.

``SCDPolicy`` is the deployment API (``from_pretrained``, ``reset``, ``step``); it is imported lazily so
that ``import scd_policy`` stays cheap for tools that only need the data layer or the config schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["SCDPolicy", "__version__"]

if TYPE_CHECKING:
    from scd_policy.runtime import SCDPolicy


def __getattr__(name: str) -> Any:
    if name == "SCDPolicy":
        from scd_policy.runtime import SCDPolicy

        return SCDPolicy
    raise AttributeError(f"module 'scd_policy' has no attribute {name!r}")
