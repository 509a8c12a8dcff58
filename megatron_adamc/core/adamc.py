"""AdamC on any torch optimizer with decoupled decay ``p -= lr * weight_decay * p``.

The corrected decay is set per param group just before ``step()`` and the base lambda is put back just after,
through torch's public step hooks. So the group's ``weight_decay`` holds the base lambda between steps: a
checkpoint stores lambda itself, a resume never compounds the correction, and a plain AdamW run can read an
AdamC checkpoint (and the reverse). The kernel is untouched and no per-parameter Python loop is added.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_adamc.core.decay import check_lr_within_peak, corrected_weight_decay

log = logging.getLogger(__name__)

# Keys AdamC keeps in each param group. They travel with the group dicts that ZeRO slices and checkpoints.
ENABLED_KEY = "adamc"  # a user may set False on a group to keep plain AdamW decay
LR_MAX_KEY = "adamc_lr_max"
APPLIED_KEY = "adamc_weight_decay_applied"  # the lambda_t of the last step, for logging


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


@dataclass
class AdamCHooks:
    """The step hooks of one optimizer. ``lr_max`` and ``enabled`` are per group, by the group's index."""

    optimizer: torch.optim.Optimizer
    lr_max: list[float]
    enabled: list[bool]
    lr_max_field: str = "lr_max"
    _inflight: list[tuple[dict, float]] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    _warned_plain: bool = False

    def install(self) -> AdamCHooks:
        self.stamp_groups(self.optimizer.param_groups)
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pre_step),
            self.optimizer.register_step_post_hook(self._post_step),
            self.optimizer.register_load_state_dict_post_hook(self._post_load),
        ]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def stamp_groups(self, groups: Sequence[dict]) -> None:
        for index, group in enumerate(groups):
            group.setdefault(ENABLED_KEY, self.enabled[index])
            group[LR_MAX_KEY] = self.lr_max[index]
            group[APPLIED_KEY] = group["weight_decay"]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore()  # a step that raised left its lambda_t in place; never compound it
        # ZeRO-1/2 step one group at a time (a one-group list); ZeRO-3 steps all groups, most of them empty.
        for group in optimizer.param_groups:
            if not group["params"]:
                continue  # not stepped now: keep its last applied value
            base = group["weight_decay"]
            if not group.get(ENABLED_KEY, False) or base == 0:
                group[APPLIED_KEY] = base
                continue
            lr = _as_float(group["lr"])
            check_lr_within_peak(lr, group[LR_MAX_KEY], self.lr_max_field)
            applied = corrected_weight_decay(base, lr, group[LR_MAX_KEY])
            self._inflight.append((group, base))
            group["weight_decay"] = applied
            group[APPLIED_KEY] = applied

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for group, base in self._inflight:
            group["weight_decay"] = base
        self._inflight.clear()

    def _post_load(self, optimizer: torch.optim.Optimizer) -> None:
        groups = optimizer.param_groups
        if len(groups) != len(self.lr_max):
            return  # a wrapper stepping a slice; the full list is stamped when it is loaded
        if any(LR_MAX_KEY not in group for group in groups) and not self._warned_plain:
            self._warned_plain = True
            log.warning(
                "AdamC: the checkpoint was saved by plain AdamW; continuing with the corrected decay "
                "(base weight decay from the checkpoint: %s)",
                [group["weight_decay"] for group in groups],
            )
        # The config is authoritative for AdamC's own settings; lambda comes from the checkpoint as usual.
        for index, group in enumerate(groups):
            group[ENABLED_KEY] = self.enabled[index] and group.get(ENABLED_KEY, True)
        self.stamp_groups(groups)


def attach_adamc(
    optimizer: torch.optim.Optimizer,
    lr_max: float | Sequence[float] | None = None,
    enabled: bool | Sequence[bool] = True,
    lr_max_field: str = "lr_max",
) -> AdamCHooks:
    """Turn an AdamW-style optimizer into AdamC. ``lr_max`` defaults to each group's lr at this call."""
    groups = optimizer.param_groups
    if lr_max is None:
        lr_max = [_as_float(group.get("initial_lr", group["lr"])) for group in groups]
    elif isinstance(lr_max, (int, float)):
        lr_max = [float(lr_max)] * len(groups)
    if isinstance(enabled, bool):
        enabled = [group.get(ENABLED_KEY, enabled) for group in groups]
    return AdamCHooks(optimizer, list(lr_max), list(enabled), lr_max_field).install()


def applied_weight_decay(param_groups: Sequence[dict]) -> float:
    """The lambda_t the decayed groups used at the last step (the largest, if groups differ)."""
    values = [group.get(APPLIED_KEY, group["weight_decay"]) for group in param_groups if group["weight_decay"] > 0]
    return max(values) if values else 0.0
