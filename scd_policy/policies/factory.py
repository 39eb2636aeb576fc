"""Build a policy from its config, or load one from a folder, by ``config.type``."""

from __future__ import annotations

from pathlib import Path

import torch

from scd_policy.config import POLICY_TYPES, ConfigError, PolicyConfig
from scd_policy.data.normalizer import Normalizer
from scd_policy.policies.base import Policy
from scd_policy.policies.causal_diffusion import CausalDiffusionPolicy
from scd_policy.policies.diffusion_policy import DiffusionPolicy
from scd_policy.policies.scd import SeparableCausalDiffusionPolicy

POLICY_CLASSES: dict[str, type[Policy]] = {
    cls.policy_type: cls for cls in (SeparableCausalDiffusionPolicy, CausalDiffusionPolicy, DiffusionPolicy)
}
assert set(POLICY_CLASSES) == set(POLICY_TYPES), "every configurable policy type needs a class"


def policy_class(policy_type: str) -> type[Policy]:
    if policy_type not in POLICY_CLASSES:
        raise ConfigError(f"unknown policy type {policy_type!r}; expected one of {sorted(POLICY_CLASSES)}")
    return POLICY_CLASSES[policy_type]


def make_policy(config: PolicyConfig, normalizer: Normalizer) -> Policy:
    """A fresh policy of type ``config.type`` (input_shapes/action_dim must be filled in)."""
    return policy_class(config.type)(config, normalizer)


def load_policy(directory: str | Path, device: str | torch.device = "cpu") -> Policy:
    """Load any policy folder written by ``save_pretrained``; the type is read from its config.json."""
    return Policy.from_pretrained(directory, device=device)
