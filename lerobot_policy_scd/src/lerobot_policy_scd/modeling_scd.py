"""``SCDPolicy``: an scd-policy ``Policy`` behind LeRobot's ``PreTrainedPolicy`` interface.

The wrapper owns one scd-policy model (``self.model``, built by ``scd_policy.policies.make_policy``)
and translates at the boundary only:

- keys: LeRobot's feature names <-> ours (``policy_key_map``: ``observation.state`` -> ``state``, one
  camera -> ``image``), so the same weights run on our environments;
- normalisation: LeRobot's dataset statistics become the model's own ``Normalizer`` (saved inside
  the weights), so the pre/post-processors only add a batch axis and move tensors (processor_scd.py);
- run time: ``select_action`` drives scd-policy's streaming runtime (``scd_policy.runtime``: one
  encoder call per control step on a KV cache, an action queue), reset by ``reset()``;
- EMA: ``update()``, which LeRobot's trainer calls after every optimiser step, keeps an exponential
  moving average of the weights (``self.ema_model``, part of the state dict, so it survives LeRobot's
  resume and ``--policy.path`` fine-tuning); the averaged weights act and are exported.

Checkpoints: next to LeRobot's ``config.json`` + ``model.safetensors`` the wrapper writes the model in
scd-policy's own format to ``<checkpoint>/scd_policy/``, which ``scd_policy.policies.load_policy`` and
``scd_policy.runtime.PolicyRuntime.from_pretrained`` read without LeRobot installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs.types import FeatureType
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION
from torch import Tensor

from lerobot_policy_scd.configuration_scd import SCDConfig, policy_key_map
from scd_policy.conventions import ACTION_KEY
from scd_policy.models.normalizer import Normalizer, affine_from_stats
from scd_policy.policies import Policy, make_policy
from scd_policy.runtime import PolicyRuntime
from scd_policy.training.ema import EMA

SCD_SUBFOLDER = "scd_policy"  # scd-policy's own checkpoint format inside a LeRobot checkpoint


_STAT_NAMES = ("min", "max", "mean", "std")  # the LeRobot per-feature statistics we read


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy().astype(np.float64)
    return np.asarray(value, dtype=np.float64)


def normalizer_from_stats(
    shapes: dict[str, list[int]],
    modes: dict[str, str],
    stats: dict[str, dict[str, Any]] | None,
    source_keys: dict[str, str],
) -> Normalizer:
    """Our Normalizer for these keys, fitted from LeRobot's per-feature statistics when given.

    ``source_keys`` maps our key -> LeRobot's. Without ``stats`` (a policy about to load its weights)
    the normaliser stays unfitted until the state_dict arrives.
    """
    normalizer = Normalizer(shapes, modes)
    if stats is None:
        return normalizer
    for key, mode in modes.items():
        if mode == "image":
            continue
        theirs = source_keys[key]
        if theirs not in stats:
            raise KeyError(f"LeRobot dataset statistics lack {theirs!r}; they cover {sorted(stats)}")
        entry = {name: _as_numpy(value) for name, value in stats[theirs].items() if name in _STAT_NAMES}
        normalizer.set_stats(
            key,
            *affine_from_stats(
                mode,
                low=entry.get("min"),
                high=entry.get("max"),
                mean=entry.get("mean"),
                std=entry.get("std"),
            ),
        )
    normalizer.fitted.fill_(True)
    return normalizer


class SCDPolicy(PreTrainedPolicy):  # type: ignore[misc]  # lerobot ships no type information
    config_class = SCDConfig
    name = "scd"

    def __init__(
        self,
        config: SCDConfig,
        dataset_stats: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,  # LeRobot's make_policy also passes dataset_meta, which is not needed here
    ) -> None:
        super().__init__(config)
        config.validate_features()
        self.config: SCDConfig = config
        self.key_map = policy_key_map(config)  # LeRobot key -> our key
        features = config.input_features or {}
        # LeRobot hands cameras as (C, H, W) float in [0, 1], the layout our policies take as well.
        input_shapes = {
            ours: [int(d) for d in features[theirs].shape] for theirs, ours in self.key_map.items()
        }
        action_dim = int((config.output_features or {})[ACTION].shape[0])
        modes = {
            ours: "image" if features[theirs].type is FeatureType.VISUAL else config.normalization
            for theirs, ours in self.key_map.items()
        }
        modes[ACTION_KEY] = config.normalization
        shapes = {**input_shapes, ACTION_KEY: [action_dim]}
        sources = {ours: theirs for theirs, ours in self.key_map.items()} | {ACTION_KEY: ACTION}
        normalizer = normalizer_from_stats(shapes, modes, dataset_stats, sources)
        self.model: Policy = make_policy(config.to_policy_config(input_shapes, action_dim), normalizer)
        # The averaged copy: a registered submodule (saved, loaded and moved with the policy) that the
        # optimiser never sees (get_optim_params reads self.model only).
        self._ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.ema_model: Policy | None = self._ema.shadow if self._ema is not None else None
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._runtime: PolicyRuntime | None = None

    @property
    def acting_model(self) -> Policy:
        """The weights that act and are exported: the EMA copy, or the trained ones without EMA."""
        return self.ema_model if self.ema_model is not None else self.model

    def update(self) -> None:
        """After an optimiser step (LeRobot's trainer calls it): move the EMA copy towards the weights."""
        if self._ema is None:
            return
        self._ema.num_updates = int(self.ema_updates)  # restored from a checkpoint's state dict
        self._ema.update(self.model)
        self.ema_updates += 1
        self._runtime = None  # a runtime built before holds the previous weights' state

    def train(self, mode: bool = True) -> SCDPolicy:
        super().train(mode)
        if self.ema_model is not None:
            self.ema_model.eval()  # never in training mode (no dropout), even while the policy trains
        return self

    # ------------------------------------------------------------------ LeRobot's interface

    def get_optim_params(self) -> list[dict[str, Any]]:
        """AdamW groups from the model: no decay on gains/biases, the SCD decoder at a larger lr."""
        return self.model.param_groups(self.config.optimizer_lr, self.config.optimizer_weight_decay)

    def reset(self) -> None:
        """Start new episodes: forget the runtime's KV cache, action queue and previous action."""
        if self._runtime is not None:
            self._runtime.reset()

    def _observations(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [key for key in self.key_map if key not in batch]
        if missing:
            raise KeyError(f"the batch lacks {missing}; the policy reads {sorted(self.key_map)}")
        return {ours: batch[theirs] for theirs, ours in self.key_map.items()}

    def forward(self, batch: dict[str, Tensor], reduction: str = "mean") -> tuple[Tensor, dict[str, Any]]:
        """Training loss on a LeRobot batch loaded at ``config.*_delta_indices``.

        obs (B, T_obs, *shape), ``<obs key>_is_pad`` (B, T_obs), ``action`` (B, T_act, Da) and
        ``action_is_pad`` (B, T_act), in raw units: the model normalises them itself.
        """
        if reduction != "mean":
            raise NotImplementedError(f"the scd policy computes a mean loss only (reduction={reduction!r})")
        obs = self._observations(batch)
        first = next(iter(self.key_map))
        obs_len = obs[self.key_map[first]].shape[:2]
        # Every observation key is loaded at the same offsets, so any one's pad mask is the window's.
        obs_is_pad = batch.get(f"{first}_is_pad")
        if obs_is_pad is None:
            obs_is_pad = torch.zeros(obs_len, dtype=torch.bool, device=batch[ACTION].device)
        ours = {
            **obs,
            "obs_is_pad": obs_is_pad,
            ACTION_KEY: batch[ACTION],
            "action_is_pad": batch[f"{ACTION}_is_pad"],
        }
        loss, metrics = self.model.compute_loss(ours)
        return loss, dict(metrics)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        """A chunk (B, n, Da) starting at the current step, from this one observation (B, *shape) alone.

        Stateless (no history beyond this step); ``select_action`` is the streaming path.
        """
        obs = {key: value[:, None] for key, value in self._observations(batch).items()}  # (B, 1, *shape)
        chunk = self.acting_model.predict_chunk(obs, noise=kwargs.get("noise"))
        offset = self.model.config.chunk_start_offset  # diffusion_policy: the chunk starts in the past
        return chunk[:, -offset:] if offset < 0 else chunk

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        """One action per environment (B, Da) for this control step, through scd-policy's runtime."""
        obs = self._observations(batch)
        n_envs = int(next(iter(obs.values())).shape[0])
        if self._runtime is None or self._runtime.num_envs != n_envs:
            self._runtime = PolicyRuntime(
                self.acting_model,
                num_envs=n_envs,
                n_action_steps=self.config.n_action_steps,
                replan_every_step=self.config.replan_every_step,
            )
        action = self._runtime.step(obs)  # (B, Da) numpy, raw units
        device = batch[next(iter(self.key_map))].device
        return torch.as_tensor(np.atleast_2d(action), dtype=torch.float32, device=device)

    # ------------------------------------------------------------------ checkpoints

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        self.acting_model.save_pretrained(Path(save_directory) / SCD_SUBFOLDER)
