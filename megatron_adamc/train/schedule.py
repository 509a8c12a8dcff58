"""The learning rate as a function of the trainer's step, applied by the trainer itself.

WHY not a torch scheduler handed to DeepSpeed: the engine steps its scheduler only when the optimizer step was
applied, so every skipped (overflowed) step would shift the whole schedule one step late, and a scheduler restored
from a checkpoint brings back the lr of the old config. Computing ``lr(step)`` from the config at every step keeps
the schedule on the step count and makes a changed ``optimizer.lr`` take effect truthfully on resume.

The peak is ``optimizer.lr`` itself (every shape stays <= 1), so AdamC's lr_max is the optimizer lr with no further
setting. Step s (1-based) uses multiplier(s - 1); warmup starts above 0 so that the first step learns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any


def lr_multiplier(
    kind: str, steps: int, warmup: int, min_ratio: float, decay_fraction: float
) -> Callable[[int], float]:
    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        if kind == "wsd":
            decay_start = max(warmup, steps - max(1, round(decay_fraction * steps)))
            if step < decay_start:
                return 1.0
            progress = (step - decay_start + 1) / max(1, steps - decay_start)
        else:
            progress = (step - warmup + 1) / max(1, steps - warmup)
        progress = min(progress, 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return multiplier


class LRSchedule:
    """``lr(step)`` for steps 1..``steps`` from the optimizer and scheduler sections of the config."""

    def __init__(self, config: Any) -> None:
        sched, peak = config.scheduler, config.optimizer.lr
        self.peak = peak
        self._multiplier = lr_multiplier(
            sched.type, config.train.steps, sched.warmup_steps, sched.min_lr / peak, sched.decay_fraction
        )

    def lr(self, step: int) -> float:
        return self.peak * self._multiplier(step - 1)

    def apply(self, param_groups: Iterable[dict[str, Any]], step: int) -> float:
        """Write step ``step``'s lr into every group (before its forward); returns it."""
        lr = self.lr(step)
        for group in param_groups:
            group["lr"] = lr
        return lr
