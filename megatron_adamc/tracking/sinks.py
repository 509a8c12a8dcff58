"""TensorBoard for tracked metrics, one panel per transformer layer (metrics.jsonl: ``megatron_adamc.metrics_file``)."""

from __future__ import annotations

import math
from typing import Any

from megatron_adamc.core.norms import layer_of


def tensorboard_tag(key: str) -> str:
    """``grad_norm/layers.3.attn.qkv.weight`` -> ``layers.3/grad_norm/attn.qkv.weight``.

    TensorBoard groups tags by their first ``/`` segment, so each layer gets its own section. A key whose last
    segment is not a parameter or module name (no dot: ``loss``, ``fp8/weight/overflow_frac``) is left as it is.
    """
    prefix, _, name = key.rpartition("/")
    if not prefix or "." not in name:
        return key
    layer = layer_of(name)
    rest = name[len(layer) + 1 :]
    return f"{layer}/{prefix}/{rest}" if rest else f"{layer}/{prefix}"


def write_tensorboard(writer: Any, metrics: dict[str, Any], step: int) -> None:
    """Write every finite number of ``metrics`` to a ``SummaryWriter`` under ``tensorboard_tag(key)``."""
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        writer.add_scalar(tensorboard_tag(key), value, global_step=step)
