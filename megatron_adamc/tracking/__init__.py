"""Norm tracking on the partitioned FP32 master weights: per-layer norms against the theory, activations,
low-precision headroom and a spike alarm. See docs/tracking.md.

Names resolve lazily: the config (``TrackingConfig``) is read by every command that loads a training config, and
must not pull in torch and DeepSpeed with it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Tracker": "tracker",
    "TrackingConfig": "config",
    "tensorboard_tag": "sinks",
    "write_tensorboard": "sinks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
