"""The project's Llama tensors <-> Hugging Face's, both ways, and which HF architecture a config maps onto.

The maths is a renaming plus two row splits: ``attn.qkv`` is ``[q; k; v]`` stacked by rows (q: n_heads*head_dim
rows, k and v: n_kv_heads*head_dim each) and ``mlp.fc1`` is ``[gate; up]``. No permutation: the project's RoPE
turns the pair (x_i, x_{i+hd/2}), which is HF's rotate-half convention. QK-norm (a per-head RMSNorm on q and k,
before RoPE) is Qwen3's ``q_norm``/``k_norm``, applied at the same place with the same fp32 maths, so a ``qk_norm``
model exports as ``Qwen3ForCausalLM``. Options neither architecture has are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_adamc.errors import CheckpointError, ConfigError
from megatron_adamc.model.config import LlamaConfig

LLAMA = "LlamaForCausalLM"
QWEN3 = "Qwen3ForCausalLM"
MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3"}

# Options with no counterpart in HF Llama or Qwen3: what each does, for the refusal. z_loss, init and init_std
# act in training only and export as they are.
UNSUPPORTED = {
    "qkv_norm": "an RMSNorm over the fused q/k/v output in place of the attention pre-norm",
    "post_proj_norm": "an RMSNorm on the attention output",
    "post_fc2_norm": "an RMSNorm on the MLP output",
    "softmax_cap": "tanh-capped attention logits",
    "embedding_scale": "embeddings multiplied by sqrt(d)",
    "embedding_norm": "a LayerNorm after the embedding",
}


def hf_architecture(config: LlamaConfig) -> str:
    """``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` for ``qk_norm``; ConfigError naming every option neither has."""
    defaults = LlamaConfig.model_fields
    refused = [name for name in UNSUPPORTED if getattr(config, name) != defaults[name].default]
    if refused:
        said = "; ".join(f"model.{name}={getattr(config, name)} ({UNSUPPORTED[name]})" for name in refused)
        raise ConfigError(
            f"{said}: no Hugging Face Llama or Qwen3 layer computes this, so the export would not be the trained "
            f"model; export supports the standard Llama and qk_norm (as Qwen3ForCausalLM)"
        )
    return QWEN3 if config.qk_norm else LLAMA


def tensor_plan(config: LlamaConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...] | None]]:
    """Per project tensor: its HF name(s) and, for a fused one, the row counts it splits into."""
    q_rows, kv_rows = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    plan: list[tuple[str, tuple[str, ...], tuple[int, ...] | None]] = [
        ("tok_embeddings.weight", ("model.embed_tokens.weight",), None)
    ]
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        attn = [f"{hf}self_attn.{name}.weight" for name in ("q_proj", "k_proj", "v_proj")]
        plan += [
            (f"{ours}attn_norm.weight", (f"{hf}input_layernorm.weight",), None),
            (f"{ours}attn.qkv.weight", tuple(attn), (q_rows, kv_rows, kv_rows)),
            (f"{ours}attn.proj.weight", (f"{hf}self_attn.o_proj.weight",), None),
            (f"{ours}mlp_norm.weight", (f"{hf}post_attention_layernorm.weight",), None),
            (f"{ours}mlp.fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), (config.ffn_dim,) * 2),
            (f"{ours}mlp.fc2.weight", (f"{hf}mlp.down_proj.weight",), None),
        ]
        if config.qk_norm:
            plan += [
                (f"{ours}attn.q_norm.weight", (f"{hf}self_attn.q_norm.weight",), None),
                (f"{ours}attn.k_norm.weight", (f"{hf}self_attn.k_norm.weight",), None),
            ]
    plan.append(("norm.weight", ("model.norm.weight",), None))
    if not config.tie_embeddings:
        plan.append(("output.weight", ("lm_head.weight",), None))
    return plan


def to_hf(state: Mapping[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """HF tensors from project tensors (names and shapes already checked against ``Llama(config)``)."""
    hf_architecture(config)
    out: dict[str, torch.Tensor] = {}
    for ours, hf_names, rows in tensor_plan(config):
        parts = state[ours].split(list(rows), dim=0) if rows else (state[ours],)
        out.update((name, part.contiguous().clone()) for name, part in zip(hf_names, parts, strict=True))
    return out


def from_hf(tensors: Mapping[str, torch.Tensor], config: LlamaConfig, where: str) -> dict[str, torch.Tensor]:
    """Project tensors from HF tensors: every HF tensor the config implies must be there, and no other weight.

    Ignored: rotary ``inv_freq`` buffers (old checkpoints carry them; they follow from rope_theta) and
    ``lm_head.weight`` of a tied model (some releases store the tied copy).
    """
    plan = tensor_plan(config)
    wanted = {name for _, hf_names, _ in plan for name in hf_names}
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise CheckpointError(f"{where}: missing {missing[0]} ({len(missing)} missing): not a complete checkpoint")
    ignored = {name for name in tensors if name.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        ignored.add("lm_head.weight")
    extra = sorted(tensors.keys() - wanted - ignored)
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor {extra[0]} ({len(extra)} in all): the checkpoint has layers "
            f"the project's Llama lacks (bias, adapters?); only plain Llama/Qwen3 weights import"
        )
    out: dict[str, torch.Tensor] = {}
    for ours, hf_names, rows in plan:
        parts = [tensors[name] for name in hf_names]
        out[ours] = torch.cat(parts, dim=0) if rows else parts[0]
    return out
