"""The AdamC decay rule (Defazio 2025, arXiv 2506.02285).

With a decaying learning rate gamma_t and a constant decoupled weight decay lambda, a layer followed by a
normalization settles at ||g||/||x|| = sqrt(2 lambda / gamma_t), which grows as gamma_t -> 0. Decaying by
lambda_t = lambda * gamma_t / gamma_max instead pins the steady state at sqrt(2 lambda / gamma_max).
Under AdamW semantics (the decay step is lr * wd * x) the per-step shrink becomes 1 - lambda * gamma_t^2 / gamma_max.
"""

from __future__ import annotations

import math

from megatron_adamc.errors import UserError

# Relative slack before an lr counts as "above the peak": schedulers compute the peak in floating point.
LR_MAX_RTOL = 1e-6


class AdamCError(UserError, ValueError):
    """A user's AdamC setting is wrong; the message is one line naming the field and the fix."""


def corrected_weight_decay(weight_decay: float, lr: float, lr_max: float) -> float:
    """lambda_t = lambda * lr_t / lr_max: the weight decay to hand the optimizer for a step taken at ``lr``."""
    return weight_decay * lr / lr_max


def validate_weight_decay(weight_decay: float, field: str) -> float:
    if not isinstance(weight_decay, (int, float)) or math.isnan(weight_decay) or weight_decay < 0:
        raise AdamCError(f"{field} must be a number >= 0 (got {weight_decay!r}): set a non-negative weight decay")
    return float(weight_decay)


def validate_lr_max(lr_max: float, field: str) -> float:
    if not isinstance(lr_max, (int, float)) or not math.isfinite(lr_max) or lr_max <= 0:
        raise AdamCError(f"{field} must be a number > 0 (got {lr_max!r}): set it to the schedule's peak learning rate")
    return float(lr_max)


def check_lr_within_peak(lr: float, lr_max: float, field: str) -> None:
    """AdamC assumes lr_t <= lr_max; a larger lr would scale the decay above lambda, so it is refused."""
    if lr > lr_max * (1.0 + LR_MAX_RTOL):
        raise AdamCError(
            f"{field}: a step uses lr {lr:.6g} above lr_max {lr_max:.6g}; set {field} to the schedule's peak lr"
        )
