"""AdamC for DeepSpeed: ``"type": "AdamC"`` in the DeepSpeed JSON.

An installed megatron-adamc registers AdamC by itself when DeepSpeed is first imported (``megatron_adamc.autoload``,
off with MEGATRON_ADAMC_AUTOLOAD=0), so unmodified HF Trainer / Accelerate / DeepSpeed scripts need nothing more.
Where that start-up hook cannot run (``python -S``, a copy only on PYTHONPATH), register by hand:

import deepspeed, megatron_adamc.deepspeed as mad
mad.register()
engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
"""

from __future__ import annotations

from typing import Any

from megatron_adamc.core.adamc import applied_weight_decay
from megatron_adamc.deepspeed.engine_patch import register
from megatron_adamc.param_groups import decay_param_groups

__all__ = ["applied_weight_decay", "decay_param_groups", "initialize", "register"]


def initialize(**kwargs: Any) -> Any:
    """``register()`` and ``deepspeed.initialize(**kwargs)`` in one call."""
    import deepspeed

    register()
    return deepspeed.initialize(**kwargs)
