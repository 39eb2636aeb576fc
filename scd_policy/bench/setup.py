"""Policies, observations and training batches for the benchmarks (synthetic, realistic layout)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from omegaconf import OmegaConf
from torch import Tensor

from scd_policy.config import ConfigError, PolicyConfig, config_dir
from scd_policy.conventions import is_policy_image
from scd_policy.models.normalizer import Normalizer
from scd_policy.policies import Policy, make_policy

IMAGE_SHAPE = (3, 96, 96)  # CHW, one camera


def size_preset(name: str) -> dict[str, Any]:
    """The fields of ``configs/size/<name>.yaml``."""
    path = config_dir() / "size" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"size={name!r}: no {path}; known presets: {known}")
    values = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(values, dict)
    return {str(k): v for k, v in values.items()}


def input_shapes(state_dim: int, images: bool) -> dict[str, list[int]]:
    shapes = {"state": [state_dim]}
    if images:
        shapes["image"] = list(IMAGE_SHAPE)
    return shapes


def make_normalizer(state_dim: int, action_dim: int, images: bool, seed: int) -> Normalizer:
    """A normaliser fitted on random data (its cost is the same whatever the statistics)."""
    rng = np.random.default_rng(seed)
    data = {
        "state": rng.normal(0.0, 1.0, size=(256, state_dim)).astype(np.float32),
        "action": rng.uniform(-1.0, 1.0, size=(256, action_dim)).astype(np.float32),
    }
    modes = {"state": "mean_std", "action": "min_max"}
    if images:
        data["image"] = np.zeros((1, *IMAGE_SHAPE), dtype=np.float32)
        modes["image"] = "image"
    return Normalizer.fit(data, modes)


def build_policy(
    policy_type: str,
    size: str,
    state_dim: int,
    action_dim: int,
    images: bool,
    device: str,
    seed: int,
    overrides: Mapping[str, Any] | None = None,
) -> Policy:
    """An untrained policy of the preset with its zero-initialised parts (AdaLN-Zero tables, final
    projections) randomised, so activations look like a trained network's rather than exact zeros."""
    config = PolicyConfig(
        **{**size_preset(size), **(overrides or {}), "type": policy_type},
        input_shapes=input_shapes(state_dim, images),
        action_dim=action_dim,
    )
    torch.manual_seed(seed)
    policy = make_policy(config, make_normalizer(state_dim, action_dim, images, seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            if param.dim() >= 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return policy.to(device).eval()


def context_window_for(history: int) -> int:
    """The run-time window that holds ``history`` past steps plus the current one, so a primed runtime
    stays at exactly ``history`` steps of context while it keeps stepping (the policy is not changed)."""
    return history + 1


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_observation(
    rng: np.random.Generator, num_envs: int, state_dim: int, images: bool
) -> dict[str, npt.NDArray[Any]]:
    """One control tick's raw observation as an environment hands it over (HWC uint8 frames)."""
    lead = () if num_envs == 1 else (num_envs,)
    obs: dict[str, npt.NDArray[Any]] = {
        "state": rng.normal(0.0, 1.0, size=(*lead, state_dim)).astype(np.float32)
    }
    if images:
        c, h, w = IMAGE_SHAPE
        obs["image"] = rng.integers(0, 256, size=(*lead, h, w, c), dtype=np.uint8)
    return obs


def training_batch(policy: Policy, batch: int, seed: int) -> dict[str, Tensor]:
    """A raw-unit training batch with the layout ``compute_loss`` expects for this policy type."""
    config = policy.config
    gen = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    steps = config.train_window if config.is_causal else config.n_obs_steps
    n_actions = len(config.action_offsets)  # what the dataset hands over (past actions included)
    out: dict[str, Tensor] = {}
    for key, shape in config.input_shapes.items():
        if is_policy_image(shape):
            out[key] = torch.rand(batch, steps, *shape, generator=gen)
        else:
            out[key] = torch.randn(batch, steps, *shape, generator=gen)
    out["obs_is_pad"] = torch.zeros(batch, steps, dtype=torch.bool)
    out["action"] = torch.rand(batch, n_actions, config.action_dim, generator=gen) * 2 - 1
    out["action_is_pad"] = torch.zeros(batch, n_actions, dtype=torch.bool)
    return {key: value.to(device) for key, value in out.items()}
