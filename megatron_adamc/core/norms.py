"""Norm maths of both trackers (DeepSpeed's and Megatron's), free of either framework so it can be checked by hand.

Every rank sums squares (and dot products) over its own slices of its tensors (``slice_sums``, ``update_sums``);
after one all-reduce the sums are those of the full tensors, and everything else here (norms, ratios, cosines,
z-scores, the per-parameter metrics and the steady-state forms) is arithmetic on them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_adamc.core.theory import (
    adam_normalized_update_ratio,
    kosson_normalized_update_ratio,
    sgd_grad_weight_ratio,
)

if TYPE_CHECKING:
    import torch

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


def slice_sums(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n, 3] float64: ||w||^2, ||g||^2 and <w, g> of each (weight, gradient) slice pair, in a few fused kernels.

    Two ``_foreach_norm`` calls (one multi-tensor kernel each on a GPU) and a dot per slice (no product copy of the
    partition); the result stays on the slices' device (no host sync). torch is imported here, not at the top: the
    string helpers below serve code that runs before torch is needed (Megatron's argument parsing)."""
    import torch

    with torch.no_grad():
        w = torch.stack(torch._foreach_norm(weights)).double()
        g = torch.stack(torch._foreach_norm(grads)).double()
        dots = torch.stack([torch.dot(a, b) for a, b in zip(weights, grads, strict=True)]).double()
        return torch.stack([w.square(), g.square(), dots], 1)


def update_sums(diffs: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n] float64: ||dx||^2 of each update slice."""
    import torch

    with torch.no_grad():
        return torch.stack(torch._foreach_norm(diffs)).double().square()


def parameter_metrics(name: str, w2: float, g2: float, wg: float, u2: float) -> dict[str, float]:
    """The per-parameter keys both trackers log, from the all-reduced sums of one parameter."""
    w, g, u = norm(w2), norm(g2), norm(u2)
    return {
        f"weight_norm/{name}": w,
        f"grad_norm/{name}": g,
        f"update_norm/{name}": u,
        f"grad_weight_ratio/{name}": ratio(g, w),
        f"update_weight_ratio/{name}": ratio(u, w),
        f"cos_weight_grad/{name}": cosine(wg, w2, g2),
    }


def predicted_forms(
    name: str, update_ratio: float, weight_decay: float, lr: float, lr_max: float | None, beta1: float | None
) -> dict[str, float]:
    """The steady-state prediction that applies to the optimizer: Adam groups (``beta1`` given) get Defazio's Adam
    form and Kosson's rotational equilibrium of ||dx||/(lr ||x||) beside that measured ratio; SGD groups the SGD form
    of ||g||/||x||. ``weight_decay`` is the base lambda, ``lr_max`` AdamC's peak (None: plain decay)."""
    if weight_decay <= 0 or lr <= 0:
        return {}
    if beta1 is None:
        return {f"predicted_ratio/{name}": sgd_grad_weight_ratio(weight_decay, lr, lr_max)}
    return {
        f"normalized_update_ratio/{name}": update_ratio / lr,
        f"predicted_adam_ratio/{name}": adam_normalized_update_ratio(weight_decay, lr, lr_max),
        f"predicted_kosson_ratio/{name}": kosson_normalized_update_ratio(weight_decay, lr, beta1, lr_max),
    }


_WRAPPER_PREFIX = "module."  # Megatron's DDP and Float16Module wrappers hold the model as ``.module``


def strip_wrappers(name: str) -> str:
    """``module.module.decoder.layers.0.x`` -> ``decoder.layers.0.x``: the name of the model under its wrappers."""
    while name.startswith(_WRAPPER_PREFIX):
        name = name[len(_WRAPPER_PREFIX) :]
    return name
