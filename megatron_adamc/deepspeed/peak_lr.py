"""lr_max for each param group, read from a DeepSpeed config before any scheduler has touched the groups.

Each DeepSpeed scheduler has its own notion of the peak: WarmupLR/WarmupDecayLR ramp to ``warmup_max_lr`` (not the
optimizer lr), WarmupCosineLR multiplies each group's own lr, OneCycle peaks at ``cycle_max_lr``. Reading
``group['lr']`` after the scheduler wrote its warmup value would give a far too small lr_max (the warmup pitfall).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from megatron_adamc.core.decay import AdamCError, validate_lr_max

# scheduler name -> the scheduler parameter holding its peak lr (None: the optimizer's own lr is the peak)
PEAK_PARAMETER = {
    "WarmupLR": "warmup_max_lr",
    "WarmupDecayLR": "warmup_max_lr",
    "WarmupCosineLR": None,
    "OneCycle": "cycle_max_lr",
    "OneCycleLR": "max_lr",  # torch.optim.lr_scheduler, which DeepSpeed also accepts by name
}


def _scheduler_default(name: str, parameter: str) -> Any:
    """The scheduler class's own default, so an omitted ``warmup_max_lr`` means what DeepSpeed means by it."""
    from deepspeed.runtime import lr_schedules

    cls = getattr(lr_schedules, name, None)
    if cls is None:
        return None
    param = inspect.signature(cls.__init__).parameters.get(parameter)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _per_group(value: Any, num_groups: int, field: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != num_groups:
            raise AdamCError(f"{field} has {len(value)} values for {num_groups} param groups: give one per group")
        return [validate_lr_max(v, field) for v in value]
    return [validate_lr_max(value, field)] * num_groups


def resolve_lr_max(
    group_lrs: Sequence[float],
    lr_max: Any = None,
    scheduler_name: str | None = None,
    scheduler_params: dict[str, Any] | None = None,
) -> tuple[list[float], str]:
    """Per-group lr_max and where it came from: ``params.lr_max``, else the scheduler's peak, else the group lr."""
    num_groups = len(group_lrs)
    if lr_max is not None:
        return _per_group(lr_max, num_groups, "optimizer.params.lr_max"), "optimizer.params.lr_max"
    if scheduler_name in PEAK_PARAMETER and PEAK_PARAMETER[scheduler_name] is not None:
        parameter = PEAK_PARAMETER[scheduler_name]
        value = (scheduler_params or {}).get(parameter, _scheduler_default(scheduler_name, parameter))
        if value is not None:
            field = f"scheduler.params.{parameter}"
            return _per_group(value, num_groups, field), field
    return [validate_lr_max(lr, "optimizer.params.lr") for lr in group_lrs], "optimizer lr"
