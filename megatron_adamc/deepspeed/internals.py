"""Every use this project makes of DeepSpeed's internals, in one file: a DeepSpeed upgrade is checked here.

Checked against DeepSpeed 0.19.8 (constraints.txt) and GitHub master of 2026-12. Everything else goes through
DeepSpeed's public API (``deepspeed.initialize``, the engine's ``save_checkpoint``/``load_checkpoint``/``step``, its
config classes, ``deepspeed.utils``). The ZeRO partition layout the tracker reads (flat FP32 groups and the
parameter-to-slice maps of ``DeepSpeedZeroOptimizer`` and ``DeepSpeedZeroOptimizer_Stage3``) is in
``tracking/layout.py``, whose one private call goes through ``param_partition_rank`` here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Where DeepSpeed's optimizer wrappers keep the FP32 master partitions: ZeRO 1/2, ZeRO 3 (whose base optimizer holds
# them in its groups only during a step), BF16_Optimizer.
MASTER_ATTRIBUTES = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds the FP32 master weights (ZeRO's partitions) and the Adam moments."""
    return getattr(engine, "basic_optimizer", None) or engine.optimizer


def backup_optimizer(engine: Any) -> torch.optim.Optimizer | None:
    """ZeRO-3 partial offload's second kernel (torch AdamW for the GPU-resident sub-groups), if any."""
    backup = getattr(engine.optimizer, "backup_optimizer", None)
    return backup if isinstance(backup, torch.optim.Optimizer) else None


def master_partitions(engine: Any) -> list[torch.Tensor]:
    """This rank's flat FP32 master partitions, as the wrapper keeps them between steps."""
    return [t for name in MASTER_ATTRIBUTES for t in getattr(engine.optimizer, name, None) or [] if torch.is_tensor(t)]


def global_grad_norm(engine: Any) -> Any:
    """The global gradient norm a ZeRO / BF16 wrapper computed for its last step (before clipping), or None."""
    return getattr(engine.optimizer, "_global_grad_norm", None)


def param_partition_rank(optimizer: Any, param: Any) -> int:
    """ZeRO-3: the rank whose partition holds the start of ``param``."""
    return optimizer._get_param_partition_rank(param)


def zero_config(engine: Any) -> Any:
    """The engine's parsed ``zero_optimization`` section (DeepSpeedZeroConfig)."""
    return engine._config.zero_config


def configured_optimizer_name(engine: Any) -> str | None:
    """``optimizer.type`` as the engine parsed it, before any optimizer is built."""
    return engine._config.optimizer_name


def wrap_optimizer_build(wrap: Callable[[str, Callable], Callable]) -> None:
    """Replace ``DeepSpeedEngine._configure_basic_optimizer`` / ``_configure_optimizer`` with ``wrap(name, original)``
    (how "AdamC" becomes a DeepSpeed optimizer type: DeepSpeed has no optimizer registry)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    for name in ("_configure_basic_optimizer", "_configure_optimizer"):
        setattr(DeepSpeedEngine, name, wrap(name, getattr(DeepSpeedEngine, name)))


def checkpoint_writers(engine: Any) -> list[tuple[Any, str]]:
    """(object, method) pairs through which every file of ``engine.save_checkpoint`` is written: its checkpoint
    engine's ``save`` and ``makedirs``, and the engine's copy of its recovery scripts beside the checkpoints."""
    targets = [(engine.checkpoint_engine, "save"), (engine.checkpoint_engine, "makedirs")]
    if hasattr(engine, "_copy_recovery_script"):
        targets.append((engine, "_copy_recovery_script"))
    return targets


def disable_op(name: str) -> None:
    """Make DeepSpeed treat one of its ops as unavailable on this machine (it then takes its fallback path)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[name] = False
