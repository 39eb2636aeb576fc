"""LeRobot plugin for scd-policy: ``lerobot-train --policy.type=scd`` trains an SCD policy (or a baseline,
``--policy.architecture=causal_diffusion|diffusion_policy``) with LeRobot's tools.

LeRobot imports this package because its distribution name starts with ``lerobot_policy_``; importing
registers ``SCDConfig`` under the policy type "scd" and ``SCDEnvConfig`` (our tasks, for
``lerobot-eval --env.type=scd --env.task=<task>``) under the env type "scd". LeRobot then finds
``SCDPolicy`` in ``modeling_scd`` and ``make_scd_pre_post_processors`` in ``processor_scd`` by naming
convention.
"""

from lerobot_policy_scd.configuration_scd import SCDConfig
from lerobot_policy_scd.env_scd import SCDEnvConfig
from lerobot_policy_scd.modeling_scd import SCD_SUBFOLDER, SCDPolicy
from lerobot_policy_scd.processor_scd import make_scd_pre_post_processors

__all__ = ["SCD_SUBFOLDER", "SCDConfig", "SCDEnvConfig", "SCDPolicy", "make_scd_pre_post_processors"]
