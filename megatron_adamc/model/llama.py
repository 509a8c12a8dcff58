"""Llama in plain PyTorch (RMSNorm, SwiGLU, RoPE, grouped-query attention, SDPA) with the stability switches.

Module names are part of the interface: the norm tracker hooks ``tok_embeddings``, ``layers.{i}.attn_norm``,
``layers.{i}.attn.qkv``, ``layers.{i}.attn.proj``, ``layers.{i}.mlp_norm``, ``layers.{i}.mlp.fc1``,
``layers.{i}.mlp.fc2``, ``norm`` and ``output`` (absent when tied). The optional norms are
``embedding_norm``, ``layers.{i}.attn.qkv_norm``, ``.q_norm``, ``.k_norm``, ``.proj_norm`` and
``layers.{i}.mlp.fc2_norm``; with ``qkv_norm`` the pre-norm ``layers.{i}.attn_norm`` is absent.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_adamc.model.config import LlamaConfig
from megatron_adamc.model.loss import lm_loss

_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa arrived in torch 2.5
_MAX_LOGIT_CHUNK = 1 << 24  # logits that the max-logit side computation holds at once (64 MiB in fp32)


class RMSNorm(nn.Module):
    """x / rms(x) * gain, computed in fp32 so that bf16 activations do not lose the small components."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim/2] of the RoPE angles pos * theta^(-2i/head_dim), in fp32."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, hd] by position: the pair (x_i, x_{i+hd/2}) turns by angle pos * freq_i."""
    cos, sin = cos[: x.size(1), None, :], sin[: x.size(1), None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query attention: SDPA, or the explicit path when softmax capping needs the logits.

    With ``track_max_logit`` on, ``last_max_logit`` is the largest visible logit of the last forward; SDPA keeps
    running and the logits are recomputed aside without autograd, so tracking leaves the step's maths alone.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.softmax_cap = cfg.softmax_cap
        self.track_max_logit = False
        self.max_logit_sequences = 0  # the max logit over the first N sequences of the batch; 0: all of them
        self.last_max_logit: torch.Tensor | None = None
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, q_dim + 2 * kv_dim, bias=False)
        self.qkv_norm = RMSNorm(q_dim + 2 * kv_dim, cfg.norm_eps) if cfg.qkv_norm else None
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.proj = nn.Linear(q_dim, cfg.dim, bias=False)
        self.proj_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.post_proj_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)
        if self.qkv_norm is not None:
            qkv = self.qkv_norm(qkv)
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        if self.softmax_cap is not None:
            out = self._explicit(q, k, v)
        else:
            if self.track_max_logit:
                n = self.max_logit_sequences or B
                self.last_max_logit = causal_max_logit(q[:n], k[:n])
            out = self._sdpa(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, T, -1))
        return self.proj_norm(out) if self.proj_norm is not None else out

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.n_kv_heads == self.n_heads:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if _SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(cap(q k^T / sqrt(hd)) + causal mask) v, with kv heads broadcast over their query group."""
        B, H, T, hd = q.shape
        G = H // self.n_kv_heads
        q = q.reshape(B, self.n_kv_heads, G, T, hd)  # query head h uses kv head h // G, as in repeat_interleave
        logits = (q.float() @ k.float().unsqueeze(2).transpose(-2, -1)) / math.sqrt(hd)
        logits = self.softmax_cap * torch.tanh(logits / self.softmax_cap)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
        logits = logits.masked_fill(mask, float("-inf"))
        if self.track_max_logit:
            self.last_max_logit = logits.detach().amax()  # the visible (causal) entries, after capping
        probs = logits.softmax(dim=-1).to(v.dtype)
        return (probs @ v.unsqueeze(2)).reshape(B, H, T, hd)


@torch.no_grad()
def causal_max_logit(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The largest visible logit q.k/sqrt(hd) over batch, heads and causal positions, in fp32.

    q ``[B, H, T, hd]``, k ``[B, KV, T, hd]`` (query head h reads kv head h // (H // KV)). Chunked over query rows
    so that no more than ``_MAX_LOGIT_CHUNK`` logits exist at once; each chunk meets only the keys up to its last
    row, and one ``baddbmm`` adds the causal mask (0 / -inf) as it multiplies.
    """
    B, H, T, hd = q.shape
    kv_heads = k.size(1)
    group = H // kv_heads
    q = q.reshape(B, kv_heads, group, T, hd)  # the query heads of one kv head, side by side
    rows = max(1, _MAX_LOGIT_CHUNK // (B * H * T))
    best = torch.full((), float("-inf"), device=q.device)
    for start in range(0, T, rows):
        stop = min(T, start + rows)
        queries = q[..., start:stop, :].float().reshape(B * kv_heads, group * (stop - start), hd)
        keys = k[:, :, :stop].float().reshape(B * kv_heads, stop, hd)
        bias = (_cached_causal_bias if group * (stop - start) * stop <= 1 << 22 else _causal_bias)(
            start, stop, group, q.device
        )
        best = torch.maximum(best, torch.baddbmm(bias, queries, keys.mT).amax())
    return best / math.sqrt(hd)


def _causal_bias(start: int, stop: int, group: int, device: torch.device) -> torch.Tensor:
    """0 where query row ``start + i`` sees key ``j``, -inf where it does not, stacked ``group`` times."""
    hidden = torch.arange(stop, device=device) > torch.arange(start, stop, device=device)[:, None]
    return torch.zeros(hidden.shape, device=device).masked_fill_(hidden, float("-inf")).repeat(group, 1)


_cached_causal_bias = functools.lru_cache(maxsize=8)(_causal_bias)  # the usual case: one small chunk per shape


class MLP(nn.Module):
    """SwiGLU: fc2(silu(gate) * up), with gate and up fused in fc1 (first half gate, second half up)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.fc2_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.post_fc2_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(x).chunk(2, dim=-1)
        out = self.fc2(F.silu(gate) * up)
        return self.fc2_norm(out) if self.fc2_norm is not None else out


class Block(nn.Module):
    """Pre-norm residual block. ``qkv_norm`` removes the attention pre-norm (Rybakov et al., method 2).

    With ``checkpointed`` on (``model.parallelize.apply_activation_checkpointing``) a training forward runs under
    non-reentrant ``torch.utils.checkpoint``, with ``checkpoint_contexts`` as its ``context_fn`` when set (selective
    checkpointing's policy; None: torch's default, the whole block recomputed). The block checkpoints itself,
    rather than a wrapper module around it, so module and parameter names stay as they are.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = None if cfg.qkv_norm else RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.checkpointed = False
        self.checkpoint_contexts: Callable[[], tuple[AbstractContextManager, AbstractContextManager]] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not self.checkpointed or not torch.is_grad_enabled():
            return self.residual_forward(x, cos, sin)
        if self.checkpoint_contexts is None:  # not torch's noop_context_fn: Dynamo cannot trace that one passed in
            return checkpoint(self.residual_forward, x, cos, sin, use_reentrant=False)
        return checkpoint(self.residual_forward, x, cos, sin, use_reentrant=False, context_fn=self.checkpoint_contexts)

    def residual_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x) if self.attn_norm is not None else x, cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only Llama. ``forward(tokens[B, T]) -> fp32 logits[B, T, V]``; initialised from ``seed``.

    Built under ``torch.device("meta")`` it allocates nothing (for parameter counts, or ``to_empty`` then
    ``init_weights``).
    """

    def __init__(self, config: LlamaConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.embedding_norm = nn.LayerNorm(config.dim, eps=config.norm_eps) if config.embedding_norm else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # fp32 tables, not buffers: see rope()
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights(seed)

    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from ``seed`` (a generator on the parameters' device, so CPU and GPU draws differ).

        ``normal``: every matrix N(0, init_std). ``small`` (Takase et al., arXiv 2312.16903, after Nguyen &
        Salazar's Small Init): every matrix N(0, sqrt(2/(5d))), the output projections ``attn.proj`` and
        ``mlp.fc2`` further divided by sqrt(2 * n_layers) (Megatron's ``scaled_init_method_normal``). Norm gains 1,
        biases 0.
        """
        cfg = self.config
        device = self.tok_embeddings.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        std = cfg.init_std if cfg.init == "normal" else math.sqrt(2.0 / (5.0 * cfg.dim))
        depth_std = std if cfg.init == "normal" else std / math.sqrt(2.0 * cfg.n_layers)
        with torch.no_grad():
            for name, module in self.named_modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    is_out_proj = name.endswith(("attn.proj", "mlp.fc2"))
                    module.weight.normal_(0.0, depth_std if is_out_proj else std, generator=gen)
                elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                    module.weight.fill_(1.0)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin tables on ``device``, built once in fp32. Plain attributes rather than buffers, so that
        ``model.bfloat16()`` (DeepSpeed's bf16) cannot round the angles, and nothing goes into checkpoints."""
        if self._rope is None or self._rope[0].device != device:
            cfg = self.config
            self._rope = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
        return self._rope

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input of the first block: lookup, then the optional sqrt(d) scale and embedding LayerNorm."""
        h = self.tok_embeddings(tokens)
        if self.config.embedding_scale == "sqrt_d":
            h = h * math.sqrt(self.config.dim)
        return self.embedding_norm(h) if self.embedding_norm is not None else h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.size(1)
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}: raise max_seq_len")
        cos, sin = self.rope(tokens.device)
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, weight).float()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy plus the config's z-loss: ``(loss, {"ce": ..., "z_loss": ...})``."""
        return lm_loss(logits, targets, z_loss=self.config.z_loss)

    def track_max_logits(self, enabled: bool = True, sequences: int = 0) -> None:
        """Switch ``track_max_logit`` on every attention: one extra q k^T without autograd per forward, over the
        first ``sequences`` sequences of each batch (0: all; the capping path always reads all of them)."""
        if sequences < 0:
            raise ValueError(f"sequences={sequences}: use 0 (every sequence of the batch) or a positive count")
        for layer in self.layers:
            layer.attn.track_max_logit = enabled
            layer.attn.max_logit_sequences = sequences
            layer.attn.last_max_logit = None

    def max_logits(self) -> list[torch.Tensor | None]:
        """Per layer, the max attention logit of the last forward (None where tracking is off)."""
        return [layer.attn.last_max_logit for layer in self.layers]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` drops the input lookup table (the untied output stays)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 * matmul params + 12 * n_layers * dim * seq_len (attention scores and
        values, counted over the full T x T as in PaLM's MFU, arXiv 2204.02311 appendix B). A tied output still
        costs its matmul."""
        cfg = self.config
        matmul = self.num_params(exclude_embeddings=True) + (cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0)
        return 6 * matmul + 12 * cfg.n_layers * cfg.dim * seq_len
