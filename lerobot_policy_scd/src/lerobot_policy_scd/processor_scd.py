"""Pre/post-processors of the scd policy: a batch axis and a device move; nothing is rescaled.

Normalisation is part of the scd-policy model itself (its ``Normalizer`` is fitted from the dataset
statistics and saved with the weights), so that the same weights run unchanged in scd-policy's own
runtime. The pipelines still hold LeRobot's Normalizer/Unnormalizer steps, with the identity mode for
every feature type (``SCDConfig.normalization_mapping``): fine-tuning with ``--policy.path`` makes
LeRobot's trainer override exactly those steps (new statistics, the config's mapping), and with the
identity mapping they keep passing the data through unscaled, as the model expects.
"""

from __future__ import annotations

from typing import Any

import torch
from lerobot.processor import (
    AddBatchDimensionProcessorStep,
    DeviceProcessorStep,
    NormalizerProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    RenameObservationsProcessorStep,
    UnnormalizerProcessorStep,
)
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
from lerobot.utils.constants import POLICY_POSTPROCESSOR_DEFAULT_NAME, POLICY_PREPROCESSOR_DEFAULT_NAME

from lerobot_policy_scd.configuration_scd import SCDConfig


def make_scd_pre_post_processors(
    config: SCDConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,  # kept by the identity steps only
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """(preprocessor, postprocessor) for LeRobot's train/eval loops."""
    device = config.device or "cpu"
    input_steps = [
        RenameObservationsProcessorStep(rename_map={}),  # LeRobot's CLIs may fill in a rename map
        AddBatchDimensionProcessorStep(),
        DeviceProcessorStep(device=device),
        NormalizerProcessorStep(
            features={**(config.input_features or {}), **(config.output_features or {})},
            norm_map=config.normalization_mapping,
            stats=dataset_stats,
            device=device,
        ),
    ]
    output_steps = [
        UnnormalizerProcessorStep(
            features=config.output_features or {}, norm_map=config.normalization_mapping, stats=dataset_stats
        ),
        DeviceProcessorStep(device="cpu"),
    ]
    return (
        PolicyProcessorPipeline[dict[str, Any], dict[str, Any]](
            steps=input_steps, name=POLICY_PREPROCESSOR_DEFAULT_NAME
        ),
        PolicyProcessorPipeline[PolicyAction, PolicyAction](
            steps=output_steps,
            name=POLICY_POSTPROCESSOR_DEFAULT_NAME,
            to_transition=policy_action_to_transition,
            to_output=transition_to_policy_action,
        ),
    )
