"""The Llama config: the real shapes of the presets and the stability switches, each off by default.

All switches off is the standard Llama. Every switch is one field so that an ablation is one ``--set`` away.
Sources of the shapes: Llama 2 (arXiv 2307.09288) and Llama 3 (arXiv 2407.21783) papers and released configs;
``1B`` is TinyLlama-1.1B (arXiv 2401.02385); ``125M``/``350M`` are the GPT-3 small/medium widths and depths
(arXiv 2005.14165) with Llama blocks, ffn by Llama's rule (8/3 d rounded up to a multiple of 256).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LlamaConfig(BaseModel):
    """Architecture of one Llama model. Unknown keys are errors (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dim: int = Field(128, gt=0, description="model width d")
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="None = n_heads (no grouping)")
    ffn_dim: int = Field(384, gt=0, description="hidden width of SwiGLU; fc1 outputs 2*ffn_dim")
    vocab_size: int = Field(4096, gt=0)
    max_seq_len: int = Field(256, gt=0, description="longest sequence RoPE tables are built for")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False

    # Stability options (all off = standard Llama). See docs/model.md for the papers.
    qk_norm: bool = False
    qkv_norm: bool = False
    post_proj_norm: bool = False
    post_fc2_norm: bool = False
    softmax_cap: float | None = Field(None, gt=0, description="tanh cap of attention logits; Gemma 2 uses 50")
    embedding_scale: Literal["none", "sqrt_d"] = "none"
    embedding_norm: bool = False
    init: Literal["normal", "small"] = "normal"
    init_std: float = Field(0.02, gt=0, description="std of init='normal'")
    z_loss: float = Field(0.0, ge=0, description="weight of mean(logsumexp(logits)^2); Wortsman et al. use 1e-4")

    @model_validator(mode="after")
    def _check_shapes(self) -> LlamaConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}: pick n_heads dividing dim")
        if self.head_dim % 2:
            raise ValueError(f"head_dim=dim/n_heads={self.head_dim} must be even for RoPE: change dim or n_heads")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_kv_heads={self.kv_heads} does not divide n_heads={self.n_heads}: pick a divisor of n_heads"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def needs_logits(self) -> bool:
        """True when an option needs the explicit attention logits (SDPA cannot apply it)."""
        return self.softmax_cap is not None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A preset's shape with ``overrides`` on top (e.g. ``vocab_size`` from the tokenizer)."""
        if name not in PRESETS:
            raise ValueError(f"model.preset={name!r} is unknown: use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Real shapes. vocab_size / max_seq_len are the published ones; the trainer overrides vocab_size by the tokenizer's.
_GPT3 = dict(vocab_size=32000, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, max_seq_len=4096)
_LLAMA3 = dict(n_kv_heads=8, vocab_size=128256, max_seq_len=8192, rope_theta=500000.0)
PRESETS: dict[str, dict[str, Any]] = {
    # Trains ~300 steps of 8x256 tokens in minutes on 2 CPU cores.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=4096, max_seq_len=256),
    "125M": dict(_GPT3, dim=768, n_layers=12, n_heads=12, ffn_dim=2048),
    "350M": dict(_GPT3, dim=1024, n_layers=24, n_heads=16, ffn_dim=2816),
    "1B": dict(_GPT3, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632),  # TinyLlama-1.1B
    "llama2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008),
    "llama2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40, ffn_dim=13824),
    "llama3-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, ffn_dim=14336),
    "llama3-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, ffn_dim=28672),
}

# Published parameter counts, for the preset test and the docs.
PUBLISHED_PARAMS: dict[str, float] = {
    "125M": 125e6,
    "350M": 350e6,
    "1B": 1.1e9,
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.0e9,
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.6e9,
}
