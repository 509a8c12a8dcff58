"""AdamC for Megatron: a megatron-core param scheduler, Megatron-LM's ``--adamc`` (``plugin.py``, installed by the
start-up hook) and Megatron-Bridge's ``enable_adamc`` (``bridge.py``).

The scheduler classes are imported on first use: importing megatron-core prints warnings and takes seconds, and
the plugin must be able to say "Megatron-LM is missing" (or which extra to install) before that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_adamc.megatron.groups import DEFAULT_EXCLUDE, exclusion_overrides
    from megatron_adamc.megatron.scheduler import (
        ADAMC_STATE_KEY,
        HISTORY_STATE_KEY,
        AdamCParamScheduler,
        PlainParamScheduler,
    )

_EXPORTS = {
    "ADAMC_STATE_KEY": "scheduler",
    "HISTORY_STATE_KEY": "scheduler",
    "AdamCParamScheduler": "scheduler",
    "PlainParamScheduler": "scheduler",
    "DEFAULT_EXCLUDE": "groups",
    "exclusion_overrides": "groups",
}
__all__ = [
    "ADAMC_STATE_KEY",
    "DEFAULT_EXCLUDE",
    "HISTORY_STATE_KEY",
    "AdamCParamScheduler",
    "PlainParamScheduler",
    "exclusion_overrides",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
