"""Activation memory of a real forward and backward, measured by torch's own tensor-memory tracker.

``torch.distributed._tools.mem_tracker.MemTracker`` follows every tensor storage created under it (a dispatch mode
with weak references), so it measures the same thing on a CPU as the CUDA allocator would count on a GPU, without
the noise of a process's resident set. It is how the planner's activation formula is checked here (tests and
``benchmarks/activation_memory.py``) and can be run on a GPU unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MeasuredActivations:
    kept: int  # bytes alive after forward and loss, besides parameters: what the backward will read
    peak: int  # bytes alive at the step's peak, besides parameters (gradients freed as they arrive)


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


def measure_activation_memory(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> MeasuredActivations:
    """One forward, loss and backward of ``model`` (a ``megatron_adamc.model.Llama``) on ``tokens``.

    Each gradient is freed as soon as it is accumulated, as ZeRO's hooks move gradients into their buckets, so
    ``peak`` holds activations and temporaries and at most one parameter's gradient. The token and label tensors
    count (the planner counts them); the RoPE tables are built first, being constants rather than activations.
    """
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    tables = model.rope(tokens.device)
    table_bytes = sum(t.untyped_storage().nbytes() for t in tables)
    handles = [p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters() if p.requires_grad]
    tracker = MemTracker()
    tracker.track_external(model, tokens, labels, *tables)
    try:
        with tracker, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Expected a tensor", UserWarning)  # MemTracker meets None outputs
            loss, _ = model.loss(model(tokens), labels)
            current = tracker.get_tracker_snapshot("current")[tokens.device]
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")[tokens.device]
    finally:
        for handle in handles:
            handle.remove()

    def besides_parameters(snapshot: dict) -> int:
        return snapshot["Total"] - snapshot[_MemRefType.PARAM] - snapshot[_MemRefType.BUFFER] - table_bytes

    return MeasuredActivations(kept=besides_parameters(current), peak=besides_parameters(peak))
