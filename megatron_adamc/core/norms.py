"""Norm maths of the tracker, kept free of DeepSpeed so it can be checked by hand.

Every rank sums squares (and dot products) over its own slice of a tensor; after one all-reduce the sums are
those of the full tensor, and everything else here (norms, ratios, cosines, z-scores) is arithmetic on them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# DeepSpeed's clipping adds this to the norm before dividing (runtime/utils.py and both ZeRO optimizers).
CLIP_EPS = 1e-6

_LAYER = re.compile(r"^(.*?layers\.\d+)(?:\.|$)")


def norm(sum_of_squares: float) -> float:
    """sqrt of a sum of squares; a negative sum can only come from rounding of a zero tensor."""
    return math.sqrt(max(sum_of_squares, 0.0))


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN (not an error) when the denominator is 0: a zero-initialised bias, say."""
    return numerator / denominator if denominator > 0 else math.nan


def cosine(dot: float, sum_sq_a: float, sum_sq_b: float) -> float:
    """cos(a, b) from <a, b>, ||a||^2 and ||b||^2; NaN when either vector is zero."""
    denominator = math.sqrt(max(sum_sq_a, 0.0) * max(sum_sq_b, 0.0))
    return dot / denominator if denominator > 0 else math.nan


def rms(sum_of_squares: float, count: float) -> float:
    return math.sqrt(max(sum_of_squares, 0.0) / count) if count > 0 else math.nan


def unclip_factor(global_grad_norm: float | None, clip: float) -> float:
    """What DeepSpeed divided the gradients by when it clipped them: max(1, (norm + 1e-6) / clip).

    The optimizer step sees clipped gradients; multiplying by this factor gives back the gradient before
    clipping, which is the one the steady-state theory is about.
    """
    if clip <= 0 or global_grad_norm is None or not math.isfinite(global_grad_norm):
        return 1.0
    return max(1.0, (global_grad_norm + CLIP_EPS) / clip)


def zscore(value: float, history: Sequence[float], min_count: int = 8) -> float | None:
    """(value - mean) / std of ``history`` (the previous values, not including ``value``).

    None while the window holds fewer than ``min_count`` values. A flat history (std 0) gives 0 for an equal
    value and inf for any other, so a jump out of a perfectly flat curve still counts as a spike.
    """
    finite = [x for x in history if math.isfinite(x)]
    if len(finite) < min_count:
        return None
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((x - mean) ** 2 for x in finite) / len(finite))
    if not math.isfinite(value):
        return math.inf
    if std == 0:
        return 0.0 if value == mean else math.copysign(math.inf, value - mean)
    return (value - mean) / std


def layer_of(name: str) -> str:
    """The group a parameter or module belongs to: ``layers.3`` for ``layers.3.attn.qkv.weight``, else its root.

    TensorBoard groups tags by the text before the first ``/``; this gives one panel per transformer layer.
    """
    match = _LAYER.match(name)
    if match:
        return match.group(1)
    return name.split(".", 1)[0]


def log_change(current: float, previous: float) -> float:
    """|log(current / previous)|: how far a norm moved, the same for a doubling and a halving."""
    if not (current > 0 and previous > 0) or not (math.isfinite(current) and math.isfinite(previous)):
        return math.inf if current != previous else 0.0
    return abs(math.log(current / previous))
