"""Parse a data blend: a prefix, a list of prefixes, or Megatron-LM's flat ``[w1, prefix1, w2, prefix2, ...]``.

Every prefix is checked for its ``.bin`` and ``.idx`` here (present, and their sizes agreeing with the index), so a
wrong ``data.*`` path or a damaged file fails as one line naming the field instead of deep inside megatron-core.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_adamc.data.validate import check_indexed_files
from megatron_adamc.errors import DataError

Blend = tuple[list[str], list[float] | None]


def _as_weight(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def parse_blend(blend: str | Sequence[object], field: str) -> Blend:
    """Return ``(prefixes, weights or None)`` in megatron-core's blend format, with the prefixes checked on disk."""
    items = [blend] if isinstance(blend, str) else list(blend)
    if not items:
        raise DataError(f"{field} is empty; give a dataset prefix or [weight, prefix, ...]")
    weights = [_as_weight(x) for x in items[0::2]]
    if len(items) % 2 == 0 and all(w is not None for w in weights):
        prefixes = [str(p) for p in items[1::2]]
        if any(w <= 0 for w in weights):  # type: ignore[operator]
            raise DataError(
                f"{field}: blend weights must be > 0 (got {weights}); drop a dataset rather than weight it 0"
            )
        result: Blend = (prefixes, [float(w) for w in weights])  # type: ignore[arg-type]
    else:
        prefixes = [str(p) for p in items]
        result = (prefixes, None)
    for prefix in prefixes:
        check_prefix(prefix, field)
    return result


def check_prefix(prefix: str, field: str) -> str:
    """The prefix, once its ``.bin``/``.idx`` pair exists and agrees with itself (``validate.check_indexed_files``)."""
    check_indexed_files(prefix, field)
    return prefix
