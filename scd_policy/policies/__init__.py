"""Policies: SCD and the two baselines behind one protocol (``Policy``), plus build/load helpers."""

from scd_policy.policies.base import CheckpointError, Policy, StreamState, policy_class
from scd_policy.policies.causal import CausalPolicy
from scd_policy.policies.causal_diffusion import CausalDiffusionPolicy
from scd_policy.policies.diffusion_policy import DiffusionPolicy
from scd_policy.policies.factory import POLICY_CLASSES, load_policy, make_policy
from scd_policy.policies.scd import SeparableCausalDiffusionPolicy

__all__ = [
    "POLICY_CLASSES",
    "CausalDiffusionPolicy",
    "CausalPolicy",
    "CheckpointError",
    "DiffusionPolicy",
    "Policy",
    "SeparableCausalDiffusionPolicy",
    "StreamState",
    "load_policy",
    "make_policy",
    "policy_class",
]
