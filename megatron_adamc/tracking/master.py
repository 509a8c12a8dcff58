"""Per-parameter sums over the FP32 master partition, taken inside the optimizer step.

Hook point: torch's step pre/post hooks on the BASIC optimizer (the kernel DeepSpeed wraps). It is the one place
that looks the same on every stage: the flat FP32 partition is in ``param_groups`` with its gradient already
reduced and in FP32, just before the kernel reads it (pre), and the stepped weights just after (post). ZeRO-1/2
call the kernel once per group, ZeRO-3 once per sub-group, the bf16 wrapper and stage 0 once: the hooks simply
accumulate over the calls of one step. DeepSpeed has clipped the gradient by then; the pre-hook multiplies it back
by DeepSpeed's own clip factor, computed from the global norm it stored just before, so the gradient reported is
the one before clipping. AdamC's hooks sit on the same optimizer and are independent of these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_adamc.core import fp8
from megatron_adamc.core.norms import slice_sums, unclip_factor, update_sums
from megatron_adamc.tracking.layout import Layout

# Columns of the per-parameter sums.
W2, G2, WG, U2, CHANGED, STALE = range(6)
NUM_COLUMNS = 6
# Columns of the per-parameter maxima.
W_AMAX, G_AMAX = range(2)


class MasterStats:
    """Per-parameter sums of this rank's partition, between ``arm`` and ``disarm`` (the hooks exist only then)."""

    def __init__(
        self,
        layout: Layout,
        optimizers: list[torch.optim.Optimizer],
        global_norm: Callable[[], float | None],
        clip: float,
        device: torch.device,
        low_precision: bool = False,
        lp_dtype: torch.dtype | None = None,
    ) -> None:
        self.layout = layout
        self.global_norm = global_norm
        self.clip = clip
        self.device = device
        self.low_precision = low_precision
        self.lp_dtype = lp_dtype if lp_dtype in (torch.bfloat16, torch.float16) else None
        self.param_groups = optimizers[0].param_groups  # the full list; ZeRO-1/2 swap in a one-group list
        n = len(layout.names)
        self.sums = torch.zeros(n, NUM_COLUMNS, dtype=torch.float64, device=device)
        self.fp8_sums = torch.zeros(n, 2 * fp8.NUM_SUMS, dtype=torch.float64, device=device)
        self.maxima = torch.zeros(n, 2, dtype=torch.float32, device=device)
        self.weight_scales: list[float] = [1.0] * n
        self.grad_scales: list[float] = [1.0] * n
        self.fp8_ready = False
        self.factor: float | None = None
        self.step_lrs: list[float] = []
        self._snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._optimizers = optimizers
        self._handles: list[Any] = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def arm(self) -> None:
        """Hooks go in for the tracked step only: an untracked step runs the optimizer exactly as without a tracker."""
        if not self._handles:
            for optimizer in self._optimizers:
                self._handles.append(optimizer.register_step_pre_hook(self._pre))
                self._handles.append(optimizer.register_step_post_hook(self._post))
        self.sums.zero_()
        self.fp8_sums.zero_()
        self.maxima.zero_()
        self.factor = None
        self.step_lrs = [float(group["lr"]) for group in self.param_groups]
        self._snapshots.clear()

    def disarm(self) -> None:
        self._snapshots.clear()
        self.remove()

    @torch.no_grad()
    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.factor is None:
            # Set by DeepSpeed before its first kernel call of the step; the same for every call of this step.
            self.factor = unclip_factor(self.global_norm(), self.clip)
            self.step_lrs = [float(group["lr"]) for group in self.param_groups]
        f = self.factor
        weights, grads, rows = [], [], []
        for group in optimizer.param_groups:
            for param in group["params"]:
                layout = self.layout.find(param)
                if layout is None or param.grad is None or not layout.rows:
                    continue
                w = param.detach().reshape(-1)
                g = param.grad.detach().reshape(-1)
                if g.dtype != w.dtype:
                    g = g.to(w.dtype)
                weights += layout.views(w)
                grads += layout.views(g)
                rows.append(layout.row_tensor(self.device))
                if self.low_precision:
                    self._fp8(layout, w, g, f, rows[-1])
                self._snapshots[id(param)] = (param, w.clone())
        if not weights:
            return
        # Every slice of this call at once (core.norms.slice_sums, shared with the Megatron tracker).
        block = slice_sums(weights, grads).to(self.device)
        block[:, G2] *= f * f
        block[:, WG] *= f
        self.sums[:, :3].index_add_(0, torch.cat(rows), block)

    def _fp8(self, layout: Any, w: torch.Tensor, g: torch.Tensor, f: float, rows: torch.Tensor) -> None:
        """E4M3 on the master weights, E5M2 on the gradient before clipping (``g * f``, folded into the scale)."""
        sums, amax = [], []
        for row, ws, gs in zip(layout.rows, layout.views(w), layout.views(g), strict=True):
            amax.append(torch.stack([ws.abs().max(), gs.abs().max() * f]))
            if not self.fp8_ready:
                continue  # the first tracked step only records the amax that the next one scales by
            w_sums = fp8.fp8_sums(ws, self.weight_scales[row], "e4m3")
            g_sums = fp8.fp8_sums(gs, self.grad_scales[row] * f, "e5m2")
            g_sums[fp8.ERROR_SQ] *= f * f
            g_sums[fp8.VALUE_SQ] *= f * f
            sums.append(torch.cat([w_sums, g_sums]))
        if sums:
            self.fp8_sums.index_add_(0, rows, torch.stack(sums).to(self.device, torch.float64))
        # A parameter appears at most once in a flat tensor, so the rows here are distinct.
        self.maxima[rows] = torch.maximum(self.maxima[rows], torch.stack(amax).to(self.device, torch.float32))

    @torch.no_grad()
    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        diffs, rows, counts = [], [], []
        for group in optimizer.param_groups:
            for param in group["params"]:
                snapshot = self._snapshots.pop(id(param), None)
                if snapshot is None:
                    continue
                layout = self.layout.find(param)
                old = snapshot[1]
                new = param.detach().reshape(-1)
                if self.lp_dtype is not None and self.low_precision:
                    # The low-precision copy DeepSpeed writes next is new.to(bf16); it equals the old copy
                    # although the master moved: that update was lost to rounding.
                    changed = new != old
                    stale = changed & (new.to(self.lp_dtype) == old.to(self.lp_dtype))
                    counts.append(torch.stack([layout.slice_sums(changed), layout.slice_sums(stale)], 1))
                diffs += layout.views(old.sub_(new))  # the snapshot is spent: its memory holds -update
                rows.append(layout.row_tensor(self.device))
        if not diffs:
            return
        columns = [update_sums(diffs).to(self.device)[:, None]]
        if counts:
            columns.append(torch.cat(counts).to(self.device, torch.float64))
        values = torch.cat(columns, 1)
        self.sums[:, U2 : U2 + values.shape[1]].index_add_(0, torch.cat(rows), values)
