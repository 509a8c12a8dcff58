"""Activation checkpointing and torch.compile of the transformer blocks, applied in place (names unchanged).

The order is torchtitan's (``torchtitan/models/llama3/parallelize.py``): checkpointing first, then compile, so each
compiled block contains its checkpoint and the compiler partitions the recompute by the same policy. Both go on
the bare model before ``deepspeed.initialize``. The modes (docs/model.md, "Activation checkpointing"; the memory
planner models the same definitions):

- ``none``: autograd keeps what each op needs for its backward.
- ``full``: each ``Block`` runs under non-reentrant ``torch.utils.checkpoint``: per layer only the block input is
  kept, and the whole block runs again in the backward.
- ``selective``: op-level selective checkpointing, as torchtitan's ``SelectiveAC``: inside each block the outputs
  of the matmuls (``mm``/``addmm``/``bmm``/``baddbmm``) and of fused attention (``_scaled_dot_product_*``) are
  kept; everything cheap between them (RMSNorm, RoPE, SiLU and the gate product, views, residual adds, the
  explicit path's tanh/mask/softmax) is recomputed.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from megatron_adamc.errors import ConfigError

ActivationCheckpointing = Literal["none", "full", "selective"]
ACTIVATION_CHECKPOINTING_MODES: tuple[str, ...] = get_args(ActivationCheckpointing)

_aten = torch.ops.aten
# The ops whose outputs selective checkpointing keeps. Attention is whichever kernel SDPA picks (flash, memory
# efficient or cuDNN on a GPU, the CPU flash kernel here); the explicit path of softmax_cap is two bmm.
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    *(
        getattr(_aten, name).default
        for name in (
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_fused_attention_overrideable",
        )
        if hasattr(_aten, name)
    ),
}


def save_matmuls_and_attention(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing's policy: keep matmul and attention outputs, recompute the rest.

    Ops under ``no_grad`` (the max-logit side computation of a tracked step) feed no backward and are never kept.
    """
    if func in _SAVED_OPS and torch.is_grad_enabled():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
    """Fresh forward and recompute contexts for one checkpointed call (each call caches its own outputs)."""
    return create_selective_checkpoint_contexts(save_matmuls_and_attention)


# What each mode sets on a block: (checkpointed, checkpoint_contexts).
_SETTINGS = {"none": (False, None), "full": (True, None), "selective": (True, selective_contexts)}


def _blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(b, "checkpointed") for b in layers):
        raise TypeError(f"{type(model).__name__} has no `layers` of checkpointable blocks (megatron_adamc.model.Llama)")
    return list(layers)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Set ``mode`` (``none``, ``full`` or ``selective``) on every block of ``model`` (a ``Llama``), in place.

    Only training forwards (grad enabled) are checkpointed; evaluation runs plainly. Call it before
    ``compile_blocks``: a compiled block has traced its mode.
    """
    if mode not in _SETTINGS:
        choices = ", ".join(ACTIVATION_CHECKPOINTING_MODES)
        raise ConfigError(f"train.activation_checkpointing={mode!r}: use one of {choices}")
    for block in _blocks(model):
        if block._compiled_call_impl is not None:
            raise RuntimeError("apply_activation_checkpointing after compile_blocks: checkpoint first, then compile")
        block.checkpointed, block.checkpoint_contexts = _SETTINGS[mode]


def activation_checkpointing(model: nn.Module) -> str:
    """The mode the blocks of ``model`` run with (for run info and tests)."""
    settings = {(block.checkpointed, block.checkpoint_contexts) for block in _blocks(model)}
    modes = {mode for mode, setting in _SETTINGS.items() if setting in settings}
    return modes.pop() if len(settings) == 1 and len(modes) == 1 else "mixed"


def check_compile(zero_stage: int) -> None:
    """Refuse ``train.compile`` where it cannot work: under ZeRO-3 DeepSpeed's parameter-gathering hooks (on every
    module, ``torch.compiler.disable``d) cut each block into eager pieces, and a checkpointed block is not compiled
    at all (Dynamo cannot trace a checkpoint whose body breaks the graph) - the flag would silently do nothing."""
    if zero_stage == 3:
        raise ConfigError(
            "train.compile=true does not work with ZeRO stage 3 (train.deepspeed): DeepSpeed's parameter hooks "
            "split every block into eager pieces; set train.compile=false or use a ZeRO-1/2 config"
        )


def compile_blocks(model: nn.Module, backend: str = "inductor", fullgraph: bool = True) -> None:
    """``torch.compile`` each block in place (``nn.Module.compile``: names, hooks and state dict unchanged).

    Compiling the repeated block rather than the whole model makes one graph that every layer reuses (torchtitan's
    choice). ``fullgraph`` (as torchtitan): a block that cannot be traced whole is an error at the first forward,
    not a silent fall-back to eager. On a step the norm tracker arms, the model runs eagerly
    (``tracking/activations.py``), so the tracker's hooks never enter a compiled graph.
    """
    for block in _blocks(model):
        block.compile(backend=backend, fullgraph=fullgraph)
