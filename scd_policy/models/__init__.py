"""Networks: transformer layers, KV cache, step tokeniser, SCD encoder/decoder and the baselines' stacks."""

from scd_policy.models.causal_dit import CausalDiffusionTransformer, History
from scd_policy.models.decoder import DiffusionDecoder
from scd_policy.models.encoder import CausalEncoder
from scd_policy.models.kv_cache import KVCache, StackedCache, StepCache, StepPlan
from scd_policy.models.tokenizer import ConvImageEncoder, StepTokenizer
from scd_policy.models.windowed_dit import WindowedDiffusionTransformer

__all__ = [
    "CausalDiffusionTransformer",
    "CausalEncoder",
    "ConvImageEncoder",
    "DiffusionDecoder",
    "History",
    "KVCache",
    "StackedCache",
    "StepCache",
    "StepPlan",
    "StepTokenizer",
    "WindowedDiffusionTransformer",
]
