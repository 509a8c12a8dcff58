"""Which decayed parameters keep plain decay under AdamC: patterns of module paths, one parser and one matcher for
Megatron's ``--adamc-exclude``, Bridge's ``scheduler.adamc_exclude`` and the trainer's ``optimizer.adamc_exclude``.

A plain dotted path matches where its components appear in a row in a parameter's name (``output_layer`` matches
``output_layer.weight``, ``layers.0`` matches ``decoder.layers.0.mlp.fc1.weight``); a pattern with ``*?[`` is a glob
over the whole name. ``"none"`` alone means no exclusion.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from megatron_adamc.core.decay import AdamCError

_GLOB = set("*?[")


def parse_exclude(value: str | Sequence[str], field: str) -> tuple[str, ...]:
    """``"output_layer,embedding"`` or a list -> the patterns; ``""`` / ``"none"`` -> none (correct every group).
    ``field`` names the setting in the error."""
    items = value.split(",") if isinstance(value, str) else [part for item in value for part in str(item).split(",")]
    patterns = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if patterns in ((), ("none",)):
        return ()
    for pattern in patterns:
        if pattern == "none" or not all(part for part in pattern.split(".")):
            raise AdamCError(
                f"{field} {pattern!r} is not a module path or glob: give dotted module names such as "
                "output_layer,embedding (or 'none' alone to correct every decayed group)"
            )
    return patterns


def pattern_matches(pattern: str, name: str) -> bool:
    """A glob matches the whole name; a plain dotted path matches where its components appear in a row."""
    if _GLOB & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    wanted, parts = pattern.split("."), name.split(".")
    return any(parts[i : i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))
