"""The Llama model with the stability options (QK/QKV norms, post norms, softmax capping, embedding scale/LN,
small init, z-loss), its config and presets, the language-model loss, and activation checkpointing / compile of
its blocks."""

from megatron_adamc.model.config import PRESETS, PUBLISHED_PARAMS, LlamaConfig
from megatron_adamc.model.llama import Attention, Llama, RMSNorm, apply_rope, rope_tables
from megatron_adamc.model.loss import lm_loss
from megatron_adamc.model.memory import ActivationMemory, LiveStorageBytes, measure_activation_memory
from megatron_adamc.model.parallelize import (
    ACTIVATION_CHECKPOINTING_MODES,
    activation_checkpointing,
    apply_activation_checkpointing,
    check_compile,
    compile_blocks,
)

__all__ = [
    "ACTIVATION_CHECKPOINTING_MODES",
    "PRESETS",
    "PUBLISHED_PARAMS",
    "ActivationMemory",
    "Attention",
    "LiveStorageBytes",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "activation_checkpointing",
    "apply_activation_checkpointing",
    "apply_rope",
    "check_compile",
    "compile_blocks",
    "lm_loss",
    "measure_activation_memory",
    "rope_tables",
]
