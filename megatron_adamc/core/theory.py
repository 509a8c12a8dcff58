"""Steady-state norm predictions for layers followed by a normalization.

SGD with decoupled decay (Defazio 2025): x <- (1 - lambda_t gamma_t) x - gamma_t g with <x, g> = 0 settles at
||g|| / ||x|| = sqrt(2 lambda_t / gamma_t). Plain decay (lambda_t = lambda) makes that grow as gamma_t -> 0;
the corrected decay (lambda_t = lambda gamma_t / gamma_max) keeps it at sqrt(2 lambda / gamma_max).

Adam(W) (Kosson et al. 2023, rotational equilibrium): the update norm over the weight norm settles at
sqrt(2 gamma_t lambda_t (1 - beta1) / (1 + beta1)).
"""

from __future__ import annotations

import math


def effective_decay(weight_decay: float, lr: float, lr_max: float | None) -> float:
    """lambda_t: the configured lambda for plain decay (lr_max None), lambda * lr / lr_max for AdamC/SGDC."""
    return weight_decay if lr_max is None else weight_decay * lr / lr_max


def sgd_grad_weight_ratio(weight_decay: float, lr: float, lr_max: float | None = None) -> float:
    """Predicted ||g|| / ||x|| at equilibrium for SGD with decoupled decay (plain, or corrected with lr_max)."""
    if lr <= 0:
        return math.inf
    return math.sqrt(2.0 * effective_decay(weight_decay, lr, lr_max) / lr)


def adam_update_weight_ratio(weight_decay: float, lr: float, beta1: float = 0.9, lr_max: float | None = None) -> float:
    """Predicted ||update|| / ||x|| per step at Adam's rotational equilibrium (plain, or AdamC with lr_max)."""
    lam = effective_decay(weight_decay, lr, lr_max)
    return math.sqrt(max(2.0 * lr * lam * (1.0 - beta1) / (1.0 + beta1), 0.0))


def equilibrium_steps(weight_decay: float, lr: float) -> float:
    """About how many steps the weight norm needs to settle: 1 / (2 lambda gamma)."""
    return math.inf if weight_decay * lr == 0 else 1.0 / (2.0 * weight_decay * lr)


def adamw_timescale(weight_decay: float, lr: float) -> float:
    """AdamW's EMA timescale tau = 1 / (lr * wd) in steps (Wang & Aitchison 2024)."""
    return math.inf if weight_decay * lr == 0 else 1.0 / (weight_decay * lr)
