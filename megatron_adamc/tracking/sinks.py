"""Where tracked metrics go: a JSON-lines file and TensorBoard, one panel per transformer layer."""

from __future__ import annotations

import json
import math
from pathlib import Path
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


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)  # JSON has no NaN/inf; keep inf readable
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def decode_number(value: Any) -> Any:
    """The inverse of ``append_jsonl``'s encoding for one value: null -> NaN, "inf"/"-inf" -> +-inf."""
    if value is None:
        return math.nan
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """One JSON object per line; NaN becomes null and inf the string "inf", so any JSON reader accepts it."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(_finite(record)) + "\n")
