"""Where each named parameter lives inside the flat FP32 tensors that the optimizer steps on this rank.

DeepSpeed hands its basic optimizer one flat FP32 tensor per param group (ZeRO-1/2, the bf16 wrapper) or per
sub-group (ZeRO-3), holding only this rank's partition. Stage 0 with bf16/fp16 weights (FP16_Optimizer)
holds one whole flat FP32 copy per group on every rank. A parameter is a contiguous slice of such a tensor (or,
under ZeRO-1/2, it may be cut between two ranks, or absent). The layout maps each flat tensor to the slices
``(row, start, numel)`` it holds, ``row`` being the parameter's index in ``model.named_parameters()``.
Read from DeepSpeed 0.19's own bookkeeping: ``_hp_mapping`` (ZeRO-1/2, BF16_Optimizer) and ``grad_position``
(ZeRO-3), which ``safe_get_full_*`` rely on as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from megatron_adamc.deepspeed.internals import base_optimizer, param_partition_rank


@dataclass
class FlatLayout:
    """The slices of one flat FP32 tensor: parallel lists, ``rows[k]`` at ``starts[k]``, ``numels[k]`` long."""

    tensor: torch.Tensor
    rows: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    _row_tensor: torch.Tensor | None = field(default=None, repr=False)

    def add(self, row: int, start: int, numel: int) -> None:
        if numel > 0:
            self.rows.append(row)
            self.starts.append(start)
            self.numels.append(numel)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat.narrow(0, s, n) for s, n in zip(self.starts, self.numels, strict=True)]

    def slice_sums(self, flat: torch.Tensor) -> torch.Tensor:
        """The sum of each slice of ``flat`` (a count, for a boolean tensor)."""
        return torch.stack([view.sum() for view in self.views(flat)])

    def row_tensor(self, device: torch.device) -> torch.Tensor:
        """``rows`` as an index tensor, built once (the slices do not change after the layout is read)."""
        if self._row_tensor is None:
            self._row_tensor = torch.tensor(self.rows, dtype=torch.long, device=device)
        return self._row_tensor


@dataclass
class Layout:
    """All flat tensors of this rank, by ``id``. ``replicated``: every rank holds every parameter whole (stage 0
    without a partitioning wrapper), so the per-rank sums must not be added up across ranks."""

    names: list[str]
    flats: dict[int, FlatLayout]
    replicated: bool
    kind: str
    group_of_row: list[int]  # index of each parameter's group in the basic optimizer's param_groups

    def find(self, tensor: torch.Tensor) -> FlatLayout | None:
        layout = self.flats.get(id(tensor))
        return layout if layout is not None and layout.tensor is tensor else None


def named_rows(model: nn.Module) -> tuple[list[str], dict[int, int]]:
    """Trainable parameter names in ``named_parameters()`` order, and ``id(param) -> row``."""
    names, rows = [], {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            rows[id(param)] = len(names)
            names.append(name)
    return names, rows


def _hp_mapped(
    groups: list[list[nn.Parameter]], flats: list[torch.Tensor], rows: dict[int, int], group_of_row: list[int]
) -> dict:
    """ZeRO-1/2 and BF16_Optimizer: each low-precision param knows its fragment of the group's FP32 partition."""
    out: dict[int, FlatLayout] = {}
    for index, (params, flat) in enumerate(zip(groups, flats, strict=True)):
        layout = FlatLayout(flat)
        for param in params:
            if id(param) in rows:
                group_of_row[rows[id(param)]] = index
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None or id(param) not in rows:
                continue
            address = mapping.get_hp_fragment_address()
            layout.add(rows[id(param)], int(address.start), int(address.numel))
        out[id(flat)] = layout
    return out


def _stage3(optimizer: Any, rows: dict[int, int], group_of_row: list[int]) -> dict:
    """ZeRO-3: sub-group ``i`` is the concatenation of its params' ``ds_tensor`` partitions (``grad_position``).

    Each partition is ``partition_numel`` long; on the last ranks its tail is padding beyond ``ds_numel``,
    which is left out (its content is not part of the parameter).
    """
    out: dict[int, FlatLayout] = {}
    for sub_group, flat in enumerate(optimizer.fp32_partitioned_groups_flat):
        layout = FlatLayout(flat)
        for param in optimizer.fp16_groups[sub_group]:
            if id(param) not in rows:
                continue
            group_of_row[rows[id(param)]] = optimizer.sub_group_to_group_id[sub_group]
            group, start, numel = optimizer.grad_position[optimizer.get_param_id(param)]
            assert group == sub_group, "ZeRO-3 grad_position disagrees with fp16_groups"
            rank = param_partition_rank(optimizer, param)
            valid = max(0, min(numel, param.ds_numel - rank * numel))
            layout.add(rows[id(param)], int(start), int(valid))
        out[id(flat)] = layout
    return out


def build_layout(engine: Any, model: nn.Module | None = None) -> Layout:
    """The layout of ``engine``'s optimizer on this rank. Raises TypeError for wrappers it does not know."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    model = model if model is not None else engine.module
    names, rows = named_rows(model)
    optimizer = engine.optimizer
    group_of_row = [-1] * len(names)
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return Layout(names, _stage3(optimizer, rows, group_of_row), False, "zero3", group_of_row)
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        flats = _hp_mapped(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups, rows, group_of_row)
        return Layout(names, flats, False, f"zero{engine.zero_optimization_stage()}", group_of_row)
    if isinstance(optimizer, FP16_Optimizer):
        # Stage 0 with bf16/fp16 weights: every rank holds the whole FP32 copy, one flat tensor per group.
        flats = {}
        for index, (params, flat) in enumerate(zip(optimizer.fp16_groups, optimizer.fp32_groups_flat, strict=True)):
            layout, start = FlatLayout(flat), 0
            for param in params:
                if id(param) in rows:
                    group_of_row[rows[id(param)]] = index
                    layout.add(rows[id(param)], start, param.numel())
                start += param.numel()
            flats[id(flat)] = layout
        return Layout(names, flats, True, "stage0_lp", group_of_row)
    if isinstance(optimizer, BF16_Optimizer):
        flats = _hp_mapped(optimizer.bf16_groups, optimizer.fp32_groups_flat_partition, rows, group_of_row)
        return Layout(names, flats, False, "bf16", group_of_row)
    if optimizer is base_optimizer(engine) and isinstance(optimizer, torch.optim.Optimizer):
        flats = {}
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                if id(param) in rows:
                    group_of_row[rows[id(param)]] = index
                    layout = FlatLayout(param)
                    layout.add(rows[id(param)], 0, param.numel())
                    flats[id(param)] = layout
        return Layout(names, flats, True, "stage0", group_of_row)
    raise TypeError(
        f"norm tracking does not know the optimizer wrapper {type(optimizer).__name__}: "
        "use ZeRO 1/2/3, or stage 0 with a fused optimizer (Adam/AdamW/AdamC)"
    )
