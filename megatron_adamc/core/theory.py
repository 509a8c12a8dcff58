"""Steady-state norm predictions, one form per optimizer, and which tensors the theory is about.

SGD with decoupled decay (Defazio 2025): x <- (1 - lambda_t gamma_t) x - gamma_t g with <x, g> = 0 settles at
||g|| / ||x|| = sqrt(2 lambda_t / gamma_t). Plain decay (lambda_t = lambda) makes that grow as gamma_t -> 0;
the corrected decay (lambda_t = lambda gamma_t / gamma_max) keeps it at sqrt(2 lambda / gamma_max).

Adam: the raw gradient does not settle (Adam divides it by sqrt(v)); its normalized direction u does. Two forms:

- Defazio's Adam form: the same recurrence with u in place of g, u orthogonal to x, so ||u|| / ||x|| settles at
  sqrt(2 lambda_t / gamma_t). Measured as ||dx|| / (gamma_t ||x||), the update of the step (decay included) over the
  lr: with u orthogonal to x that equals sqrt(2 lambda_t / gamma_t) exactly at equilibrium (the decay's own
  lambda_t^2 term cancels the one dropped from the recurrence).
- Kosson et al. 2023 (rotational equilibrium): with momentum, consecutive updates are correlated and it is the
  per-step GRADIENT contribution that is orthogonal to x; in the noise-dominated regime the update then settles
  sqrt((1 - beta1) / (1 + beta1)) lower: ||dx|| / ||x|| = sqrt(2 gamma_t lambda_t (1 - beta1) / (1 + beta1)).
  At beta1 = 0.9 the two forms differ by sqrt(19) = 4.36.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Which form a prediction is in; the report and the experiments label their figures with these.
SGD_FORM = "SGD form (Defazio): ||g||/||x|| = sqrt(2 lambda_t / lr_t)"
ADAM_FORM = "Adam form (Defazio): ||dx||/(lr_t ||x||) = sqrt(2 lambda_t / lr_t)"
KOSSON_FORM = "rotational equilibrium (Kosson): ||dx||/(lr_t ||x||) = sqrt(2 lambda_t / lr_t * (1-beta1)/(1+beta1))"

# Kinds of parameter tensor, by name (model/llama.py): the theory assumes a normalization makes the loss blind to the
# weight's scale; the block linears sit between norms (pre-norm; QK-norm and the post norms make it exact), the
# embedding and the output head are outside any.
LAYER_TYPES = ("linear", "embedding", "output", "norm", "other")


def effective_decay(weight_decay: float, lr: float, lr_max: float | None) -> float:
    """lambda_t: the configured lambda for plain decay (lr_max None), lambda * lr / lr_max for AdamC/SGDC."""
    return weight_decay if lr_max is None else weight_decay * lr / lr_max


def sgd_grad_weight_ratio(weight_decay: float, lr: float, lr_max: float | None = None) -> float:
    """Predicted ||g|| / ||x|| at equilibrium for SGD with decoupled decay (plain, or corrected with lr_max)."""
    if lr <= 0:
        return math.inf
    return math.sqrt(2.0 * effective_decay(weight_decay, lr, lr_max) / lr)


def adam_normalized_update_ratio(weight_decay: float, lr: float, lr_max: float | None = None) -> float:
    """Defazio's Adam form: predicted ||dx|| / (lr ||x||) at equilibrium (AdamW; AdamC with lr_max)."""
    return sgd_grad_weight_ratio(weight_decay, lr, lr_max)  # the same algebra, with u for g


def momentum_factor(beta1: float) -> float:
    """sqrt((1 + beta1) / (1 - beta1)): how far Defazio's Adam form sits above Kosson's (4.36 at beta1 0.9)."""
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1={beta1} must be in [0, 1)")
    return math.sqrt((1.0 + beta1) / (1.0 - beta1))


def kosson_normalized_update_ratio(weight_decay: float, lr: float, beta1: float, lr_max: float | None = None) -> float:
    """Kosson et al.'s rotational equilibrium as a predicted ||dx|| / (lr ||x||): the Adam form / momentum_factor."""
    return adam_normalized_update_ratio(weight_decay, lr, lr_max) / momentum_factor(beta1)


def adam_update_weight_ratio(weight_decay: float, lr: float, beta1: float = 0.9, lr_max: float | None = None) -> float:
    """Kosson et al.'s expected angular update per step, ||dx|| / ||x|| (plain, or AdamC with lr_max)."""
    return lr * kosson_normalized_update_ratio(weight_decay, lr, beta1, lr_max) if lr > 0 else 0.0


def equilibrium_steps(weight_decay: float, lr: float) -> float:
    """About how many steps the weight norm needs to settle: 1 / (2 lambda gamma)."""
    return math.inf if weight_decay * lr == 0 else 1.0 / (2.0 * weight_decay * lr)


def adamw_timescale(weight_decay: float, lr: float) -> float:
    """AdamW's EMA timescale tau = 1 / (lr * wd) in steps (Wang & Aitchison 2024)."""
    return math.inf if weight_decay * lr == 0 else 1.0 / (weight_decay * lr)


def integrated_decay(lrs: Sequence[float], weight_decay: float, lr_max: float | None = None) -> float:
    """sum_t lr_t lambda_t over a schedule: AdamW's lambda_t = lambda, AdamC's lambda lr_t / lr_max (lr_max given).

    The per-step shrink of the weights is (1 - lr_t lambda_t), so this is how much decay a run applies in total
    (-log of the product, to first order).
    """
    return sum(lr * effective_decay(weight_decay, lr, lr_max) for lr in lrs)


def matched_adamw_decay(lrs: Sequence[float], adamc_weight_decay: float, lr_max: float) -> float:
    """The AdamW lambda whose integrated decay over ``lrs`` equals AdamC's at ``adamc_weight_decay``.

    AdamW: lambda * sum lr_t; AdamC: lambda_C * sum lr_t^2 / lr_max. For a cosine to zero (no warmup) the ratio tends
    to (3/8) / (1/2) = 3/4.
    """
    total_lr = sum(lrs)
    if total_lr <= 0:
        raise ValueError("the schedule has no positive lr: nothing to match")
    return integrated_decay(lrs, adamc_weight_decay, lr_max) / total_lr


def layer_type(name: str) -> str:
    """One of LAYER_TYPES for a parameter name of the project's Llama (``layers.3.mlp.fc2.weight`` -> linear) or of
    Megatron's GPT (``decoder.layers.3.mlp.linear_fc2.weight``, ``output_layer.weight``)."""
    parts = name.split(".")
    leaf = parts[-2] if len(parts) > 1 else parts[0]
    if "norm" in leaf or "norm" in parts[-1]:
        return "norm"
    if "embed" in name:
        return "embedding"
    if parts[0] in ("output", "output_layer", "lm_head"):
        return "output"
    if "layers" in parts[:-1] and parts[-1] == "weight":
        return "linear"
    return "other"
