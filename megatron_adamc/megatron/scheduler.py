"""AdamC for megatron-core: the decay follows the learning-rate schedule, lambda_t = lambda * lr_t / lr_max.

megatron-core's ``OptimizerParamScheduler.step()`` writes each param group's ``lr`` and ``weight_decay`` on the
very group dicts that the (distributed) optimizer hands to its inner optimizer, so the correction belongs there:
let the parent write its plain decay ``get_wd(group) * wd_mult``, then scale it by the group's own lr over the
group's own peak. The parent recomputes the plain decay from ``get_wd`` at every step (and at resume, where its
``load_state_dict`` calls ``step``), so the correction can never compound.

Written against the scheduler's public behaviour (``step``, ``get_lr(group)``, per-group ``max_lr``), checked
against megatron-core 0.13.0 to 0.19.0 and main: the ratio uses ``get_lr(group)`` rather than ``group['lr']``, which
is a tensor under CUDA graphs on main and carried an ``lr_mult`` factor before 0.16.
"""

from __future__ import annotations

import logging

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import log_single_rank

from megatron_adamc.core.decay import check_lr_within_peak, corrected_weight_decay, validate_lr_max

logger = logging.getLogger(__name__)

# Key in the scheduler's state_dict: True for AdamC, False for PlainParamScheduler, absent for the stock class.
ADAMC_STATE_KEY = "adamc"


def group_peak_lr(scheduler: OptimizerParamScheduler, group: dict) -> float:
    """The peak the group's own schedule reaches: decoupled-lr (embedding/output) groups carry their own."""
    return float(group.get("max_lr", scheduler.max_lr))


class AdamCParamScheduler(OptimizerParamScheduler):
    """``OptimizerParamScheduler`` with the AdamC decay; same constructor, same lr, same checkpoints plus a marker.

    After every ``step`` each group holds ``weight_decay = get_wd(group) * wd_mult * lr_group / max_lr_group``.
    Warmup follows the same rule, so the decay is small while the lr is.
    """

    def step(self, increment: int) -> None:
        super().step(increment)
        for index, group in enumerate(self.optimizer.param_groups):
            group["weight_decay"] = self.corrected_weight_decay(group, index)

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
        return {**super().state_dict(), ADAMC_STATE_KEY: True}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from an AdamC or a plain checkpoint: the step count carries over, the decay is recomputed."""
        if not state_dict.get(ADAMC_STATE_KEY, False):
            log_single_rank(
                logger,
                logging.WARNING,
                f"AdamC: resuming from a plain OptimizerParamScheduler checkpoint (step {state_dict.get('num_steps')}):"
                " the steps before used the plain weight decay; from here on it is lambda * lr_t / lr_max",
            )
        super().load_state_dict(state_dict)


class PlainParamScheduler(OptimizerParamScheduler):
    """The stock scheduler, except that resuming from an AdamC checkpoint says that the decay turns plain again."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), ADAMC_STATE_KEY: False}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get(ADAMC_STATE_KEY, False):
            log_single_rank(
                logger,
                logging.WARNING,
                f"AdamC: resuming from an AdamC checkpoint (step {state_dict.get('num_steps')}) without --adamc:"
                " from here on the weight decay is plain (not scaled by lr_t / lr_max)",
            )
        super().load_state_dict(state_dict)
