"""Exact activation memory on any device: the bytes of tensor storage that ops create and that are still alive.

CUDA has allocator statistics, a CPU has none (RSS mixes in the allocator's caching and the interpreter), so this
counts storages directly: a dispatch mode sees every op's outputs, counts each new storage once and uncounts it
when it is freed. Over a forward it gives what autograd keeps for the backward, which is what activation
checkpointing changes and what the memory planner's activation term predicts; over forward + backward, the peak.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorageBytes(TorchDispatchMode):
    """``with LiveStorageBytes() as live: ...``: ``live.current`` and ``live.peak`` bytes of the storages created
    inside (views count nothing; storages made before entering, such as parameters', are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # An output on an input's storage (a view, an in-place op, a transposed parameter) allocated nothing.
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and id(leaf.untyped_storage()) not in inputs:
                self._count(leaf.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        self._seen.add(storage)
        nbytes = storage.nbytes()
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes alive after the forward (the loss included) and the peak over forward and backward."""

    after_forward: int
    peak: int


def measure_activation_memory(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> ActivationMemory:
    """One training forward and backward of ``model`` (a ``Llama``) on ``tokens``; gradients are set to None first
    and after, so that their buffers count in the peak the same way each time."""
    model.zero_grad(set_to_none=True)
    with LiveStorageBytes() as live:
        loss, _ = model.loss(model(tokens), targets)
        after_forward = live.current
        loss.backward()
        del loss
    model.zero_grad(set_to_none=True)
    return ActivationMemory(after_forward, live.peak)
