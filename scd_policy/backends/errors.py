"""The error of the backends package (its own module, so that importing it loads no runtime)."""

from __future__ import annotations

from scd_policy.config import ConfigError


class BackendError(ConfigError):
    """A backend cannot be used as asked: unknown name, a policy type it does not run, a runtime that
    is not installed, or an export folder that is incomplete or of other weights."""
