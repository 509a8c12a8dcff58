"""``LlamaConfig`` <-> Hugging Face ``config.json`` (Llama and Qwen3), refusing what the project cannot compute.

Written as plain JSON so that exporting needs no transformers. Both spellings of the RoPE base are written:
``rope_theta`` (transformers 4) and ``rope_parameters`` (transformers 5), and both are read.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from megatron_adamc.errors import ConfigError
from megatron_adamc.hf.mapping import LLAMA, MODEL_TYPES, QWEN3
from megatron_adamc.model.config import LlamaConfig

DTYPES = ("float32", "bfloat16", "float16")


def to_hf_config(
    config: LlamaConfig, architecture: str, dtype: str, bos_id: int | None, eos_id: int | None, pad_id: int | None
) -> dict[str, Any]:
    """The config.json of ``architecture`` for ``config``; token ids from the tokenizer (None: not set)."""
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if architecture == LLAMA:
        out.update(mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
        out["layer_types"] = ["full_attention"] * config.n_layers
    return out


def from_hf_config(hf: dict[str, Any], where: str) -> tuple[LlamaConfig, str]:
    """The project's config of an HF Llama or Qwen3 config.json, and its architecture. ConfigError (one line
    naming the field) for anything the project's Llama would compute differently."""
    model_type = hf.get("model_type")
    architecture = {v: k for k, v in MODEL_TYPES.items()}.get(model_type)
    if architecture is None:
        raise ConfigError(
            f"{where}: model_type={model_type!r} is not supported: import-hf reads Llama (and Qwen3) checkpoints"
        )

    def refuse(field: str, why: str, value: Any = None) -> None:
        value = hf.get(field) if value is None else value
        raise ConfigError(f"{where}: {field}={value!r} {why}; import-hf reads plain {architecture} only")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "is not SwiGLU's silu")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            refuse(field, "adds biases the project's Llama lacks")
    if hf.get("quantization_config"):
        refuse("quantization_config", "is a quantized checkpoint")
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        refuse("rope_scaling", "is a RoPE scaling the project does not implement (only plain RoPE)")
    rope_parameters = hf.get("rope_parameters") or {}
    if rope_parameters.get("rope_type", "default") != "default":
        refuse("rope_parameters", "is a RoPE scaling the project does not implement (only plain RoPE)")
    partial = rope_parameters.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        refuse("partial_rotary_factor", "rotates part of each head; the project's RoPE rotates all of it", partial)
    if architecture == QWEN3:
        if hf.get("use_sliding_window"):
            refuse("use_sliding_window", "means sliding-window attention, which the project does not implement")
        if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
            refuse("layer_types", "has layers that are not full attention")

    def need(field: str) -> Any:
        if field not in hf:
            raise ConfigError(f"{where}: {field} is missing: not a complete {architecture} config.json")
        return hf[field]

    dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = hf.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        refuse("head_dim", f"is not hidden_size/num_attention_heads={dim // n_heads} as in the project's Llama")
    theta = rope_parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
    fields = dict(
        dim=dim,
        n_layers=int(need("num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        ffn_dim=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),  # HF's default, not the project's 1e-5
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=architecture == QWEN3,
    )
    try:
        return LlamaConfig(**fields), architecture
    except ValidationError as err:
        first = err.errors()[0]
        field = f"model.{first['loc'][0]}: " if first["loc"] else ""
        raise ConfigError(f"{where}: {field}{first['msg']}") from None
