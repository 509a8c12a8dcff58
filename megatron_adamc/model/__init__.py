"""The Llama model with the stability options (QK/QKV norms, post norms, softmax capping, embedding scale/LN,
small init, z-loss), its config and presets, and the language-model loss."""

from megatron_adamc.model.config import PRESETS, PUBLISHED_PARAMS, LlamaConfig
from megatron_adamc.model.llama import Attention, Llama, RMSNorm, apply_rope, rope_tables
from megatron_adamc.model.loss import lm_loss

__all__ = [
    "PRESETS",
    "PUBLISHED_PARAMS",
    "Attention",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "apply_rope",
    "lm_loss",
    "rope_tables",
]
