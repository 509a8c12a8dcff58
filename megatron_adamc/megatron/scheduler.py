"""AdamC for megatron-core: the decay follows the learning-rate schedule, lambda_t = lambda * lr_t / lr_max.

megatron-core's ``OptimizerParamScheduler.step()`` writes each param group's ``lr`` and ``weight_decay`` on the
very group dicts that the (distributed) optimizer hands to its inner optimizer, so the correction belongs there:
let the parent write its plain decay ``get_wd(group) * wd_mult``, then scale it by the group's own lr over the
group's own peak. The parent recomputes the plain decay from ``get_wd`` at every step (and at resume, where its
``load_state_dict`` calls ``step``), so the correction can never compound.

Which groups: every decayed group except those carrying ``adamc: False`` (``--adamc-exclude``, ``groups.py``). The
flags are read once, when the scheduler is built, and written back before every step: Megatron's checkpoint load
swaps the group dicts for saved ones matched by (wd_mult, lr_mult, ...) only, which cannot tell an excluded group
from a corrected one (see docs/megatron.md, "Resuming").

Written against the scheduler's public behaviour (``step``, ``get_lr(group)``, per-group ``max_lr``), checked
against megatron-core 0.13.0 to 0.19.0 and main: the ratio uses ``get_lr(group)`` rather than ``group['lr']``, which
is a tensor under CUDA graphs on main and carried an ``lr_mult`` factor before 0.16.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from megatron_adamc.extras import require

require("megatron.core", "megatron", "the Megatron scheduler")

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.utils import log_single_rank  # noqa: E402

from megatron_adamc.core.adamc import ENABLED_KEY  # noqa: E402
from megatron_adamc.core.decay import (  # noqa: E402
    LR_MAX_RTOL,
    AdamCError,
    check_lr_within_peak,
    corrected_weight_decay,
    validate_lr_max,
)

logger = logging.getLogger(__name__)

# Keys in the scheduler's state_dict: True for AdamC, False for PlainParamScheduler, absent for the stock class;
# and the run's switches between the two, [[mode, scheduler step], ...], carried from checkpoint to checkpoint.
ADAMC_STATE_KEY = "adamc"
HISTORY_STATE_KEY = "adamc_history"


def group_peak_lr(scheduler: OptimizerParamScheduler, group: dict) -> float:
    """The peak the group's own schedule reaches: decoupled-lr (embedding/output) groups carry their own."""
    return float(group.get("max_lr", scheduler.max_lr))


def schedule_maximum(scheduler: OptimizerParamScheduler, group: dict) -> tuple[float, str]:
    """The largest lr the group's schedule reaches anywhere, and which setting gives it.

    Every decay style megatron-core has runs init_lr -> max_lr over the warmup, then moves monotonically from max_lr
    toward min_lr (cosine, linear, WSD's anneals, inverse-square-root floored at min_lr) or stays (constant); past
    the decay steps it holds min_lr. So the maximum is one of those three values."""
    peak = group_peak_lr(scheduler, group)
    candidates = [(peak, "max_lr")]
    if scheduler.lr_warmup_steps > 0:
        candidates.append((float(scheduler.init_lr), "init_lr (--lr-warmup-init)"))
    if scheduler.lr_decay_style != "constant":
        candidates.append((float(group.get("min_lr", scheduler.min_lr)), "min_lr (--min-lr / --decoupled-min-lr)"))
    return max(candidates, key=lambda item: item[0])


def _plain_decay_possible(scheduler: OptimizerParamScheduler, group: dict) -> bool:
    return group.get("wd_mult", 1.0) != 0.0 and max(scheduler.start_wd, scheduler.end_wd) > 0.0


def _record(history: Sequence, mode: str, step: int) -> list[list]:
    history = [list(item) for item in history]
    if not history or history[-1][0] != mode:
        history.append([mode, int(step)])
    return history


class AdamCParamScheduler(OptimizerParamScheduler):
    """``OptimizerParamScheduler`` with the AdamC decay; same constructor, same lr, same checkpoints plus a marker.

    After every ``step`` each corrected group holds ``weight_decay = get_wd(group) * wd_mult * lr_group /
    max_lr_group``; an excluded group (``adamc: False``) the plain decay. Warmup follows the same rule, so the decay
    is small while the lr is. Refused when built: a corrected group whose lr exceeds its peak anywhere in the
    schedule, and an optimizer captured in a CUDA graph (its decay would freeze at the capture).
    """

    def __init__(self, optimizer, *args, **kwargs) -> None:  # noqa: ANN001 - the parent's signature
        self.adamc_enabled = [bool(group.get(ENABLED_KEY, True)) for group in optimizer.param_groups]
        self.adamc_history: list[list] = [["adamc", 0]]
        self._schedule_checked = False
        super().__init__(optimizer, *args, **kwargs)

    def step(self, increment: int) -> None:
        super().step(increment)
        groups = self.optimizer.param_groups
        if len(groups) != len(self.adamc_enabled):
            raise AdamCError(
                f"the optimizer has {len(groups)} param groups, {len(self.adamc_enabled)} when AdamC's scheduler was "
                "built: build the scheduler after the optimizer's groups are final"
            )
        if not self._schedule_checked:
            self.check_schedule()
            self._schedule_checked = True
        for index, group in enumerate(groups):
            group[ENABLED_KEY] = self.adamc_enabled[index]  # a checkpoint load may have swapped the group dict
            if self.adamc_enabled[index]:
                group["weight_decay"] = self.corrected_weight_decay(group, index)

    def check_schedule(self) -> None:
        """At start-up, not mid-run: every corrected group's lr stays within its own peak over the whole schedule,
        and no corrected group belongs to a CUDA-graph-captured (capturable) optimizer."""
        for index, group in enumerate(self.optimizer.param_groups):
            if not self.adamc_enabled[index] or not _plain_decay_possible(self, group):
                continue
            field = f"max_lr of param group {index}"
            peak = validate_lr_max(group_peak_lr(self, group), field)
            highest, source = schedule_maximum(self, group)
            if highest > peak * (1.0 + LR_MAX_RTOL):
                raise AdamCError(
                    f"{field} is {peak:.6g} but its schedule reaches {highest:.6g} at {source}: AdamC would decay it "
                    f"by more than lambda; keep {source.split(' ')[0]} <= the group's peak (or exclude the group)"
                )
            if group.get("capturable", False):
                raise AdamCError(
                    f"param group {index} belongs to a CUDA-graph-captured optimizer (--optimizer-cuda-graph, "
                    "capturable=True): it reads weight_decay once at capture, so AdamC's per-step decay would freeze; "
                    "drop --optimizer-cuda-graph or --adamc"
                )

    def corrected_weight_decay(self, group: dict, index: int = 0) -> float:
        """lambda_t for ``group`` at the current step; reads the plain decay the parent has just written."""
        plain = float(group["weight_decay"])
        if plain == 0.0:  # wd_mult 0 (norms, biases) or a zero decay: nothing to scale, and no peak to check
            return 0.0
        field = f"max_lr of param group {index}"
        peak = validate_lr_max(group_peak_lr(self, group), field)
        lr = float(self.get_lr(group))
        check_lr_within_peak(lr, peak, field)
        return corrected_weight_decay(plain, lr, peak)

    def state_dict(self) -> dict:
        return {**super().state_dict(), ADAMC_STATE_KEY: True, HISTORY_STATE_KEY: self.adamc_history}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from an AdamC or a plain checkpoint: the step count carries over, the decay is recomputed, and a
        switch from plain AdamW is logged with its step and recorded in every later checkpoint."""
        steps = int(state_dict.get("num_steps", 0))
        saved = state_dict.get(HISTORY_STATE_KEY) or [["adamc" if state_dict.get(ADAMC_STATE_KEY) else "plain", 0]]
        self.adamc_history = _record(saved, "adamc", steps)
        if not state_dict.get(ADAMC_STATE_KEY, False):
            log_single_rank(
                logger,
                logging.WARNING,
                f"AdamC: resuming from a plain (AdamW-decay) OptimizerParamScheduler checkpoint at scheduler step "
                f"{steps}: the steps before used the plain weight decay; from here on it is lambda * lr_t / lr_max "
                f"(recorded in the checkpoint as {HISTORY_STATE_KEY}={self.adamc_history})",
            )
        super().load_state_dict(state_dict)


class PlainParamScheduler(OptimizerParamScheduler):
    """The stock scheduler, except that resuming from an AdamC checkpoint says that the decay turns plain again."""

    def __init__(self, optimizer, *args, **kwargs) -> None:  # noqa: ANN001 - the parent's signature
        self.adamc_history: list[list] = [["plain", 0]]
        super().__init__(optimizer, *args, **kwargs)

    def state_dict(self) -> dict:
        return {**super().state_dict(), ADAMC_STATE_KEY: False, HISTORY_STATE_KEY: self.adamc_history}

    def load_state_dict(self, state_dict: dict) -> None:
        steps = int(state_dict.get("num_steps", 0))
        saved = state_dict.get(HISTORY_STATE_KEY) or [["adamc" if state_dict.get(ADAMC_STATE_KEY) else "plain", 0]]
        self.adamc_history = _record(saved, "plain", steps)
        if state_dict.get(ADAMC_STATE_KEY, False):
            log_single_rank(
                logger,
                logging.WARNING,
                f"AdamC: resuming from an AdamC checkpoint at scheduler step {steps} without --adamc: from here on "
                f"the weight decay is plain (not scaled by lr_t / lr_max); recorded as {HISTORY_STATE_KEY}="
                f"{self.adamc_history}",
            )
        super().load_state_dict(state_dict)
