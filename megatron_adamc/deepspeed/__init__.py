"""AdamC for DeepSpeed: ``register()`` once, then ``"type": "AdamC"`` in the DeepSpeed JSON.

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
