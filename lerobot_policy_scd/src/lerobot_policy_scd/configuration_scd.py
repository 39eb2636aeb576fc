"""``SCDConfig``: scd-policy's PolicyConfig as a LeRobot policy config (``--policy.type=scd``).

The fields are ``scd_policy.config.PolicyConfig``'s, derived from it (``PolicyFields``: same names,
types and defaults, so a field added there appears here; same validation: a value PolicyConfig rejects
is rejected when this config is built), plus the optimiser preset that LeRobot's trainer reads.
``architecture`` picks the network: ``scd`` (default) or one of the two baselines, ``causal_diffusion``
and ``diffusion_policy``. Input shapes and the action size are not fields: they come from the
dataset's features, as for every LeRobot policy.

Time offsets are PolicyConfig's, so one source of truth decides what LeRobot's dataset loads
(``observation_delta_indices`` / ``action_delta_indices``) and what our own trainer loads.
"""

# No `from __future__ import annotations`: draccus reads these annotations at run time.
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode
from lerobot.optim.optimizers import AdamWConfig
from lerobot.optim.schedulers import DiffuserSchedulerConfig
from lerobot.utils.constants import ACTION, OBS_STATE

from scd_policy.config import ConfigError, DiffusionConfig, PolicyConfig

OBSERVATION_TYPES = (FeatureType.STATE, FeatureType.ENV, FeatureType.VISUAL)
# PolicyConfig fields that are not options here: the architecture has its own name, and the shapes come
# from the dataset's features, as for every LeRobot policy.
NOT_OPTIONS = ("type", "input_shapes", "action_dim")


def _policy_fields() -> type:
    """A dataclass with every PolicyConfig option (resolved types, the same defaults)."""
    hints = typing.get_type_hints(PolicyConfig)
    specs: list[tuple[str, Any, Any]] = []
    for spec in dataclasses.fields(PolicyConfig):
        if spec.name in NOT_OPTIONS:
            continue
        if spec.default_factory is not dataclasses.MISSING:
            default = dataclasses.field(default_factory=spec.default_factory)
        else:
            default = dataclasses.field(default=spec.default)
        specs.append((spec.name, hints[spec.name], default))
    return dataclasses.make_dataclass("PolicyFields", specs)


PolicyFields = _policy_fields()
POLICY_OPTIONS = tuple(spec.name for spec in dataclasses.fields(PolicyFields))
NORMALIZATION_MODES = ("min_max", "mean_std")
FEATURE_TYPE_NAMES = ("VISUAL", "STATE", "ENV", "ACTION")  # LeRobot's normalization_mapping keys
CAMERA_PREFIX = "observation.images."


def camera_name(key: str) -> str:
    """``observation.images.top`` -> ``top``; ``observation.image`` -> ``image``."""
    return key.removeprefix(CAMERA_PREFIX).removeprefix("observation.")


def policy_key_map(config: "SCDConfig") -> dict[str, str]:
    """LeRobot feature key -> scd-policy observation key, the names ``scd-convert`` gives them too.

    ``observation.state`` -> ``state``, ``observation.environment_state`` -> ``env_state``, any other
    observation vector -> its name without ``observation.``; one camera -> ``image``, several ->
    ``image_<camera>``. A policy trained here therefore runs on our environments' observations.
    """
    inputs = config.input_features or {}
    keys: dict[str, str] = {}
    for key, ft in sorted(inputs.items()):
        if ft.type is FeatureType.ENV:
            keys[key] = "env_state"
        elif ft.type is FeatureType.STATE:
            keys[key] = "state" if key == OBS_STATE else key.removeprefix("observation.").replace(".", "_")
    visual = sorted(key for key, ft in inputs.items() if ft.type is FeatureType.VISUAL)
    if config.cameras is not None:
        wanted = set(config.cameras)
        unknown = sorted(wanted - set(visual) - {camera_name(key) for key in visual})
        if unknown:
            raise ValueError(
                f"policy.cameras names {unknown}, which the dataset lacks; its cameras: {visual}"
            )
        visual = [key for key in visual if key in wanted or camera_name(key) in wanted]
    for key in visual:
        keys[key] = "image" if len(visual) == 1 else f"image_{camera_name(key)}"
    return keys


@PreTrainedConfig.register_subclass("scd")
@dataclass
class SCDConfig(PolicyFields, PreTrainedConfig):  # type: ignore[misc,valid-type]  # lerobot ships no types
    """PolicyConfig's options (``PolicyFields``: horizon, windows, network, SCD recipe, diffusion) plus
    the ones below, for LeRobot's CLIs and trainer. ``PolicyFields`` comes first among the bases so that
    its fields win where PreTrainedConfig has one of the same name (``n_obs_steps``)."""

    architecture: str = "scd"  # "scd", "causal_diffusion" or "diffusion_policy"

    # Inputs: which cameras to use (None: every camera of the dataset), how vectors are normalised
    # (statistics from the LeRobot dataset, stored inside the policy's weights).
    cameras: list[str] | None = None
    normalization: str = "min_max"
    # LeRobot's own normaliser steps (processor_scd.py): identity for every feature type, because the
    # model normalises inside. Not an option: another mode would scale the data twice.
    normalization_mapping: dict[str, NormalizationMode] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(FEATURE_TYPE_NAMES, NormalizationMode.IDENTITY)
    )

    # Run time: replan at every control step with temporal ensembling (cheap for SCD).
    replan_every_step: bool = False

    # Exponential moving average of the weights, updated after every optimiser step (LeRobot's trainer
    # calls policy.update()); the averaged weights are the ones that act and that are exported, as in
    # scd-policy's own trainer (train.ema_decay). 0 turns it off (the trained weights act).
    ema_decay: float = 0.999

    # Optimiser preset (LeRobot's trainer reads these through get_optimizer_preset).
    optimizer_lr: float = 3e-4
    optimizer_betas: tuple[float, float] = (0.9, 0.999)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 1e-2
    grad_clip_norm: float = 1.0
    scheduler_name: str = "cosine"
    scheduler_warmup_steps: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalization not in NORMALIZATION_MODES:
            raise ConfigError(
                f"policy.normalization={self.normalization!r}; expected one of {NORMALIZATION_MODES}"
            )
        if self.scheduler_warmup_steps < 0:
            raise ConfigError("policy.scheduler_warmup_steps must be >= 0")
        if any(mode != NormalizationMode.IDENTITY for mode in self.normalization_mapping.values()):
            raise ConfigError(
                "policy.normalization_mapping must stay IDENTITY: the scd policy normalises inside the "
                "model (choose its mode with policy.normalization=min_max|mean_std)"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"policy.ema_decay={self.ema_decay}; expected in [0, 1) (0: no averaging)")
        self.to_policy_config()  # every PolicyConfig rule, checked now rather than at the first batch

    def to_policy_config(
        self, input_shapes: dict[str, list[int]] | None = None, action_dim: int = 0
    ) -> PolicyConfig:
        """The scd-policy config these fields describe (shapes filled in once the features are known)."""
        options = {name: getattr(self, name) for name in POLICY_OPTIONS}
        if isinstance(options["diffusion"], dict):  # a config read back from JSON by a plain constructor
            options["diffusion"] = DiffusionConfig(**options["diffusion"])
        options["image_channels"] = list(options["image_channels"])
        return PolicyConfig(
            type=self.architecture,
            **options,
            input_shapes=dict(input_shapes or {}),
            action_dim=action_dim,
        )

    # ---- what LeRobot's dataset loads per sample (indices in frames, relative to the sample's frame)
    @property
    def observation_delta_indices(self) -> list[int]:
        return self.to_policy_config().observation_offsets

    @property
    def action_delta_indices(self) -> list[int]:
        return self.to_policy_config().action_offsets

    @property
    def reward_delta_indices(self) -> None:
        return None

    # ---- LeRobot's training presets
    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(
            lr=self.optimizer_lr,
            betas=self.optimizer_betas,
            eps=self.optimizer_eps,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.grad_clip_norm,
        )

    def get_scheduler_preset(self) -> DiffuserSchedulerConfig:
        return DiffuserSchedulerConfig(name=self.scheduler_name, num_warmup_steps=self.scheduler_warmup_steps)

    def validate_features(self) -> None:
        inputs = self.input_features or {}
        if not any(ft.type in OBSERVATION_TYPES for ft in inputs.values()):
            raise ValueError(
                f"the scd policy needs at least one observation feature (state, environment state or a "
                f"camera); the dataset gives {sorted(inputs)}"
            )
        outputs = self.output_features or {}
        if ACTION not in outputs or len(outputs[ACTION].shape) != 1:
            raise ValueError(f"the scd policy needs an {ACTION!r} vector feature; outputs are {outputs}")
        policy_key_map(self)  # checks policy.cameras against the dataset's cameras
