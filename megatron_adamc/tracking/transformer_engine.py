"""Transformer Engine's real FP8 amax history, when TE runs the model (GPU only).

Guarded: without ``transformer_engine`` this returns nothing, and the FP8 simulation stands in. Not tested here
(no GPU, no TE wheel for CPU); the attribute names follow TE 1.x's ``fp8_meta["scaling_fwd" | "scaling_bwd"]``
(``amax_history`` [history, tensors], ``scale`` [tensors]).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn


def available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@torch.no_grad()
def te_amax_metrics(model: nn.Module) -> dict[str, float]:
    """``fp8_te/{fwd,bwd}_amax/<module>`` (largest amax in the history) and ``fp8_te/{fwd,bwd}_scale/<module>``."""
    if not available():
        return {}
    metrics: dict[str, float] = {}
    for name, module in model.named_modules():
        meta = getattr(module, "fp8_meta", None)
        if not isinstance(meta, dict):
            continue
        for key, kind in (("scaling_fwd", "fwd"), ("scaling_bwd", "bwd")):
            state = meta.get(key)
            history = getattr(state, "amax_history", None)
            scale = getattr(state, "scale", None)
            if isinstance(history, torch.Tensor) and history.numel():
                metrics[f"fp8_te/{kind}_amax/{name}"] = float(history.float().amax())
            if isinstance(scale, torch.Tensor) and scale.numel():
                metrics[f"fp8_te/{kind}_scale/{name}"] = float(scale.float().amin())
    return metrics
