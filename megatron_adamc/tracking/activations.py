"""Forward hooks on the quantities that grow before a divergence (Rybakov et al., arXiv 2410.16682).

RMS of the outputs of ``layers.{i}.attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, and the largest attention
logit of ``layers.{i}.attn`` (its ``last_max_logit``, set when ``track_max_logit`` is on: the model recomputes
q k^T aside, without autograd, and keeps SDPA for the step). The hooks are registered for a tracked step only (an
untracked step runs the model exactly as without a tracker); each keeps one device-side norm (no host sync) that
the tracker reduces with everything else.
With FP8 simulation on, the INPUT of each tracked linear (what an FP8 GEMM would cast) goes through the E4M3
delayed-scaling cast too.

Activation checkpointing recomputes a block in the backward and so runs its forward hooks a second time on the
same values: the hooks ignore calls made inside a backward pass, so every output is counted once. A compiled model
runs eagerly on armed steps (``torch.compiler.set_stance("force_eager")``), so the hooks never enter a compiled
graph and a tracked step measures exactly what an eager one does.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from megatron_adamc.core import fp8
from megatron_adamc.core.fp8 import AmaxHistory

LINEAR = re.compile(r"(?:^|\.)layers\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$")
ATTENTION = re.compile(r"(?:^|\.)(layers\.\d+)\.attn$")
SUMSQ, COUNT = range(2)


def in_backward() -> bool:
    """True while autograd runs a backward: a forward hook called then is a checkpoint's recompute (what DeepSpeed's
    ZeRO-3 tests too, ``torch._C._current_graph_task_id() != -1``, to tell a recompute from a forward)."""
    return torch._C._current_graph_task_id() != -1


class ActivationStats:
    """Sums of squares and element counts per tracked module; maxima of logits and FP8 input amax."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        low_precision: bool,
        amax_history: int,
        max_logit_sequences: int = 0,
    ) -> None:
        self.device = device
        self.max_logit_sequences = max_logit_sequences
        self.low_precision = low_precision
        self.modules: list[str] = []
        self.layers: list[str] = []
        self._attention: list[nn.Module] = []
        self._restore: list[tuple[bool, int]] = []
        self._hooks: list[tuple[nn.Module, Any]] = []  # registered by ``arm``, removed by ``disarm``
        self._handles: list[Any] = []
        for name, module in model.named_modules():
            if LINEAR.search(name):
                self._hooks.append((module, self._linear_hook(len(self.modules))))
                self.modules.append(name)
            match = ATTENTION.search(name)
            if match and hasattr(module, "track_max_logit"):
                self._hooks.append((module, self._attention_hook(len(self.layers))))
                self.layers.append(match.group(1))
                self._attention.append(module)
        self.histories = [AmaxHistory("e4m3", amax_history) for _ in self.modules]
        self._norms: list[torch.Tensor] = []
        self._norm_rows: list[int] = []
        self._counts = [0] * len(self.modules)
        self.fp8_sums = torch.zeros(len(self.modules), fp8.NUM_SUMS, dtype=torch.float64, device=device)
        # Columns of maxima: the input amax of each linear, then the max logit of each attention layer.
        self.maxima = torch.full((len(self.modules) + len(self.layers),), -torch.inf, device=device)
        self._scales = [1.0] * len(self.modules)
        self._stance: Any = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def arm(self) -> None:
        if not self._handles:
            self._handles = [module.register_forward_hook(hook) for module, hook in self._hooks]
        self._norms, self._norm_rows, self._counts = [], [], [0] * len(self.modules)
        self.fp8_sums.zero_()
        self.maxima.fill_(-torch.inf)
        self._scales = [history.scale() for history in self.histories]
        # The max logit costs one q k^T per layer (over ``max_logit_sequences`` sequences of each micro-batch):
        # only on armed steps. A model that tracks it always is left as it is.
        self._restore = [(bool(m.track_max_logit), getattr(m, "max_logit_sequences", 0)) for m in self._attention]
        for module in self._attention:
            if not module.track_max_logit:
                module.track_max_logit = True
                module.max_logit_sequences = self.max_logit_sequences
            module.last_max_logit = None
        if self._stance is None:
            self._stance = torch.compiler.set_stance("force_eager")

    def disarm(self) -> None:
        for module, (tracked, sequences) in zip(self._attention, self._restore, strict=True):
            module.track_max_logit = tracked
            module.max_logit_sequences = sequences
        self._restore = [(False, 0)] * len(self._attention)
        if self._stance is not None:
            self._stance.__exit__(None, None, None)  # back to the stance before ``arm``
            self._stance = None
        self.remove()

    def _linear_hook(self, index: int):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor) or in_backward():
                return
            with torch.no_grad():
                # One fused reduction, kept on the device; the sums are formed once, in ``sums()``.
                self._norms.append(torch.linalg.vector_norm(output.detach(), dtype=torch.float32))
                self._norm_rows.append(index)
                self._counts[index] += output.numel()
                if self.low_precision and inputs and isinstance(inputs[0], torch.Tensor):
                    x = inputs[0].detach()
                    self.maxima[index] = torch.maximum(self.maxima[index], x.abs().max().float())
                    if self.histories[index].ready:
                        self.fp8_sums[index] += fp8.fp8_sums(x, self._scales[index], "e4m3").to(self.fp8_sums.dtype)

        return hook

    def sums(self) -> torch.Tensor:
        """``[modules, 2]`` float64: sum of squares and element count of each module's outputs on this rank."""
        out = torch.zeros(len(self.modules), 2, dtype=torch.float64, device=self.device)
        if self._norms:
            squares = torch.stack(self._norms).to(self.device, torch.float64).square()
            out[:, SUMSQ].index_add_(0, torch.tensor(self._norm_rows, device=self.device), squares)
        out[:, COUNT] = torch.tensor(self._counts, dtype=torch.float64, device=self.device)
        return out

    def _attention_hook(self, index: int):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            logit = getattr(module, "last_max_logit", None)
            if isinstance(logit, torch.Tensor) and not in_backward():
                column = len(self.modules) + index  # all linears are known by now, not at registration
                self.maxima[column] = torch.maximum(self.maxima[column], logit.detach().float().to(self.device))

        return hook

    def push_amax(self, maxima: list[float]) -> None:
        """After the reduction: the step's input amax joins each linear's history (the delayed scale)."""
        if self.low_precision:
            for history, amax in zip(self.histories, maxima[: len(self.modules)], strict=True):
                history.push(amax)
