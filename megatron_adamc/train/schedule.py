"""Learning-rate schedules as a multiplier of the peak lr, for torch's LambdaLR.

The peak is ``optimizer.lr`` itself (every shape stays <= 1), so AdamC's lr_max is the optimizer lr with no further
setting. Step s (0-based) is the s-th optimizer step; warmup starts above 0 so that the first step learns.
"""

from __future__ import annotations

import math
from collections.abc import Callable


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
