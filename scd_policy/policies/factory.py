"""Build a policy from its config, or load one from a folder, by ``config.type``.

The classes register themselves (``Policy.__init_subclass__``); importing them here makes sure the
three built-in ones are registered before anything is built or loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The built-in classes register themselves as these modules are imported.
import scd_policy.policies.causal_diffusion
import scd_policy.policies.diffusion_policy
import scd_policy.policies.scd  # noqa: F401
from scd_policy.config import POLICY_TYPES, PolicyConfig
from scd_policy.models.normalizer import Normalizer
from scd_policy.policies.base import Policy, policy_class, registered_policies

POLICY_CLASSES: dict[str, type[Policy]] = registered_policies()
assert set(POLICY_TYPES) <= set(POLICY_CLASSES), "every configurable policy type needs a class"


def make_policy(config: PolicyConfig, normalizer: Normalizer) -> Policy:
    """A fresh policy of type ``config.type`` (input_shapes/action_dim must be filled in)."""
    return policy_class(config.type)(config, normalizer)


def load_policy(directory: str | Path, device: str | torch.device = "cpu") -> Policy:
    """Load any policy folder written by ``save_pretrained``; the type is read from its config.json."""
    return Policy.from_pretrained(directory, device=device)
