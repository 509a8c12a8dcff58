"""AdamC for Megatron: a megatron-core param scheduler and a Megatron-LM ``pretrain_gpt`` plugin.

The scheduler classes are imported on first use: importing megatron-core prints warnings and takes seconds, and
the plugin must be able to say "Megatron-LM is missing" before that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_adamc.megatron.scheduler import ADAMC_STATE_KEY, AdamCParamScheduler, PlainParamScheduler

__all__ = ["ADAMC_STATE_KEY", "AdamCParamScheduler", "PlainParamScheduler"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from megatron_adamc.megatron import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
