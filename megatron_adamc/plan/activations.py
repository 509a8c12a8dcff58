"""Activation memory of one micro batch: the bytes autograd keeps from the forward for the backward, tensor by tensor.

Counted from the code of ``megatron_adamc/model/llama.py`` (each term names the tensor it is), for activations of
``act_bytes`` per element (2 under DeepSpeed bf16/fp16, 4 in fp32) and the model's fixed fp32 islands: RMSNorm
saves its input as fp32 plus one fp32 rstd per row, the attention log-sum-exp and the loss side are fp32. Storage
shared by several saved tensors is counted once (``v`` is a view of the fused qkv output, ``up`` of the fc1 output,
the SDPA output of the projection's input). ``tests/test_plan.py`` checks every term against torch's own memory
tracker on this CPU, to the byte per token.

Checkpointing modes (``train.activation_checkpointing``):

- ``none``: everything below is kept.
- ``full``: each block runs under ``torch.utils.checkpoint`` (non-reentrant), so a block keeps only its input; the
  backward recomputes one block at a time, which needs that block's ``none`` set once more (``recompute``).
- ``selective``: torchtitan's op-level policy: inside a block the outputs of the matmuls (``aten.mm``/``addmm``/
  ``bmm``) and of the attention kernel are kept and the cheap ops (norms, RoPE, SiLU, products) are recomputed.

Outside the blocks (embedding, final norm, output layer, loss: the ``head``) nothing is checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_adamc.model.config import LlamaConfig

MODES: tuple[str, ...] = ("none", "full", "selective")

FP32 = 4
RSTD = 4  # one fp32 1/rms per row of every RMSNorm
TOKEN_IDS = 8  # int64


def _norm(width: int, act_bytes: int, rows: int = 1, input_kept_elsewhere: bool = False) -> int:
    """RMSNorm as llama.RMSNorm computes it: ``rms_norm(x.float()).type_as(x) * weight``, over ``rows`` rows of
    ``width / rows`` per token.

    Keeps the fp32 input (a copy, unless activations are fp32 already, where ``x.float()`` is ``x``), the rstd and
    the cast output (kept by the product with the gain). In fp32 an input that another op keeps costs nothing more.
    """
    fp32_input = 0 if (input_kept_elsewhere and act_bytes == FP32) else FP32 * width
    return fp32_input + RSTD * rows + act_bytes * width


def block_bytes_per_token(cfg: LlamaConfig, act_bytes: int, seq_len: int, micro_batch: int) -> dict[str, float]:
    """What one transformer block keeps without checkpointing, per token, by tensor."""
    a, d, f = act_bytes, cfg.dim, cfg.ffn_dim
    kv = cfg.kv_heads * cfg.head_dim
    qkv = d + 2 * kv
    heads, kv_heads = cfg.n_heads, cfg.kv_heads
    parts: dict[str, float] = {}
    if cfg.qkv_norm:  # no pre-norm: the projection reads the block input itself
        parts["qkv_input (block input)"] = a * d
        parts["qkv_norm"] = _norm(qkv, a)
    else:
        parts["attn_norm"] = _norm(d, a)
        parts["qkv_input (normed x gain)"] = a * d
    if cfg.softmax_cap is None:
        parts["qkv_output (kept whole through the v view)"] = a * qkv
    elif cfg.qk_norm and a == FP32:
        parts["qkv_output (kept through the fp32 q/k norm inputs)"] = a * qkv
    if cfg.qk_norm:
        # per head; their inputs are views of the qkv output (kept already when activations are fp32)
        parts["q_norm, k_norm"] = _norm(d, a, heads, input_kept_elsewhere=True) + _norm(
            kv, a, kv_heads, input_kept_elsewhere=True
        )
    if cfg.softmax_cap is None:
        parts["sdpa q, k (after RoPE)"] = a * (d + kv)
        parts["sdpa output = proj input"] = a * d
        parts["sdpa logsumexp"] = FP32 * heads
    else:
        # The explicit path: matmul broadcasts k and v over each kv head's query group into copies (n_heads wide)
        # and keeps fp32 T x T tensors per head.
        parts["fp32 q, k expanded to n_heads"] = 2 * FP32 * d
        parts["tanh(logits), softmax"] = 2 * FP32 * heads * seq_len
        if a != FP32:
            parts["probs cast"] = a * heads * seq_len
        parts["causal mask"] = seq_len / micro_batch  # a T x T bool per micro batch
        parts["v expanded to n_heads"] = a * d
        parts["proj input"] = a * d
    if cfg.post_proj_norm:
        parts["proj_norm"] = _norm(d, a)
    parts["mlp_norm"] = _norm(d, a)
    parts["fc1_input (normed x gain)"] = a * d
    parts["fc1_output (gate | up)"] = 2 * a * f
    parts["silu(gate)"] = a * f
    parts["fc2_input"] = a * f
    if cfg.post_fc2_norm:
        parts["fc2_norm"] = _norm(d, a)
    return parts


def selective_block_bytes_per_token(cfg: LlamaConfig, act_bytes: int, seq_len: int) -> dict[str, float]:
    """What a block keeps under op-level selective checkpointing: its input plus matmul and attention outputs."""
    a, d, f = act_bytes, cfg.dim, cfg.ffn_dim
    kv = cfg.kv_heads * cfg.head_dim
    parts: dict[str, float] = {
        "block input": a * d,
        "mm: qkv output": a * (d + 2 * kv),
        "mm: proj output": a * d,
        "mm: fc1 output": 2 * a * f,
        "mm: fc2 output": a * d,
    }
    if cfg.softmax_cap is None:
        parts["sdpa output, logsumexp"] = a * d + FP32 * cfg.n_heads
    else:
        parts["bmm: fp32 logits, probs @ v"] = FP32 * cfg.n_heads * seq_len + a * d
    return parts


def head_bytes_per_token(cfg: LlamaConfig, act_bytes: int) -> dict[str, float]:
    """Kept outside the blocks: token ids, the embedding LayerNorm, the final norm, the output layer, the loss."""
    a, d, vocab = act_bytes, cfg.dim, cfg.vocab_size
    parts: dict[str, float] = {"tokens, labels (int64)": 2 * TOKEN_IDS}
    if cfg.embedding_norm:  # LayerNorm keeps its input and fp32 mean and rstd (CUDA; bf16 on a CPU)
        parts["embedding_norm"] = a * d + 2 * FP32
    parts["final norm"] = _norm(d, a)
    parts["output input (normed x gain)"] = a * d
    if cfg.z_loss:
        parts["fp32 logits, logsumexp, target index, mask (z-loss)"] = FP32 * vocab + FP32 + TOKEN_IDS + 1
    else:
        parts["log_softmax (fp32)"] = FP32 * vocab
    return parts


def logits_temporaries_per_token(cfg: LlamaConfig) -> int:
    """Transient fp32 [tokens, vocab] tensors at the start of the backward, beyond the kept ones: the loss gradient
    and the log-softmax (cross-entropy) gradient, or four of them on the z-loss path (logsumexp and gather)."""
    return (4 if cfg.z_loss else 2) * FP32 * cfg.vocab_size


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes for one micro batch on one GPU."""

    kept: int  # left by the forward for the backward (blocks and head)
    recompute: int  # one block's full set, rebuilt during the backward (0 without checkpointing)
    logits_temporaries: int  # transient loss-side tensors at the start of the backward
    per_layer_kept: int
    head_kept: int

    @property
    def total(self) -> int:
        """kept + recompute: the activation term of the plan (logits temporaries are listed with the buffers)."""
        return self.kept + self.recompute


def activation_memory(cfg: LlamaConfig, seq_len: int, micro_batch: int, mode: str, act_bytes: int) -> ActivationMemory:
    tokens = seq_len * micro_batch
    full_block = sum(block_bytes_per_token(cfg, act_bytes, seq_len, micro_batch).values())
    if mode == "none":
        per_layer = full_block
    elif mode == "full":
        per_layer = act_bytes * cfg.dim  # the block input, held by the checkpoint for the recomputation
    elif mode == "selective":
        per_layer = sum(selective_block_bytes_per_token(cfg, act_bytes, seq_len).values())
    else:
        raise ValueError(f"activation_checkpointing={mode!r}: use one of {', '.join(MODES)}")
    head = sum(head_bytes_per_token(cfg, act_bytes).values())
    per_layer_bytes = round(per_layer * tokens)
    head_bytes = round(head * tokens)
    return ActivationMemory(
        kept=cfg.n_layers * per_layer_bytes + head_bytes,
        recompute=0 if mode == "none" else round(full_block * tokens),
        logits_temporaries=logits_temporaries_per_token(cfg) * tokens,
        per_layer_kept=per_layer_bytes,
        head_kept=head_bytes,
    )
