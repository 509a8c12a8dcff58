"""A tiny random ``LlamaForCausalLM`` and a fixed token dataset for the HF Trainer / Accelerate scripts (no download).

Shared by the scripts and the in-process tests, so every run trains the same weights on the same batches. The numbers
are the hyperparameters the scripts hand to HF (``learning_rate`` is the schedule's peak, and so AdamC's lr_max).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

STEPS, MICRO_BATCH, SEQ, VOCAB = 8, 4, 16, 128
LR, WD, WARMUP = 1e-2, 0.5, 2
APPLIED_KEY = "adamc_weight_decay_applied"  # what megatron-adamc writes into each group; read as a user would


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip


def token_rows(n: int = STEPS * MICRO_BATCH) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]
