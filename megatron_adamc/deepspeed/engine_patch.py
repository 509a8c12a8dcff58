"""Make ``"type": "AdamC"`` a DeepSpeed optimizer.

DeepSpeed has no optimizer registry, so ``register()`` adds the name to its list of known optimizers (which keeps
ZeRO's "untested optimizer" check quiet) and wraps two engine methods:

- ``_configure_basic_optimizer``: for AdamC, builds exactly the optimizer DeepSpeed builds for "AdamW" with the same
  params (FusedAdam, DeepSpeedCPUAdam under offload, torch AdamW with ``torch_adam``) and attaches the corrected
  decay to it through torch's step hooks. The kernel, and so ZeRO's exact-type support check, is unchanged.
  With ``"decay_split"`` it first splits the caller's param groups into decay / no-decay (``decay_split.py``).
- ``_configure_optimizer``: refuses AdamC beside a client optimizer, and on the DeepSpeed paths that step with
  something other than the base optimizer (``step_paths.py``), which AdamC cannot correct.

``megatron_adamc.autoload`` calls ``register()`` by itself when DeepSpeed is first imported, in any installed copy.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from megatron_adamc.core.adamc import ENABLED_KEY, attach_adamc
from megatron_adamc.core.decay import AdamCError, validate_weight_decay
from megatron_adamc.deepspeed.decay_split import PARAM as DECAY_SPLIT_PARAM
from megatron_adamc.deepspeed.decay_split import decay_split_mode, per_caller_group, split_param_groups
from megatron_adamc.deepspeed.peak_lr import resolve_lr_max
from megatron_adamc.deepspeed.step_paths import refuse_unsupported_step_paths
from megatron_adamc.extras import require

log = logging.getLogger(__name__)

ADAMC = "adamc"
LR_MAX_PARAM = "lr_max"
_PATCHED = "_megatron_adamc_patched"


def _check_params(params: dict[str, Any]) -> None:
    if not params.get("adam_w_mode", True):
        raise AdamCError("optimizer.params.adam_w_mode must stay true for AdamC (its decay is decoupled): remove it")
    validate_weight_decay(params.get("weight_decay", 0.0), "optimizer.params.weight_decay")
    if "lr" in params and (not isinstance(params["lr"], (int, float)) or params["lr"] <= 0):
        raise AdamCError(f"optimizer.params.lr must be a number > 0 (got {params['lr']!r}): set the peak lr")


def _build_adamc(engine: Any, model_parameters: Any) -> Any:
    """The "AdamW" branch of DeepSpeed's _configure_basic_optimizer, plus the corrected decay."""
    params = dict(engine.optimizer_params() or {})
    _check_params(params)
    lr_max = params.pop(LR_MAX_PARAM, None)
    params.pop("adam_w_mode", None)
    split = decay_split_mode(params.pop(DECAY_SPLIT_PARAM, False))
    if split is not None:
        default_wd = float(params.get("weight_decay", 0.0))
        model_parameters, origin = split_param_groups(engine.module, model_parameters, split, default_wd)
        lr_max = per_caller_group(lr_max, origin, f"optimizer.params.{LR_MAX_PARAM}")
    optimizer_cls, kwargs = engine.get_optimizer_configuration(params, True)
    optimizer = optimizer_cls(model_parameters, **params, **kwargs)
    groups = optimizer.param_groups
    for index, group in enumerate(groups):
        validate_weight_decay(group["weight_decay"], f"param_groups[{index}].weight_decay")
    lr_maxes, source = resolve_lr_max(
        [float(g["lr"]) for g in groups], lr_max, engine.scheduler_name(), engine.scheduler_params()
    )
    enabled = [bool(group.get(ENABLED_KEY, True)) for group in groups]
    engine.adamc_hooks = attach_adamc(optimizer, lr_maxes, enabled, lr_max_field="optimizer.params.lr_max")
    if engine.global_rank == 0:
        log.info(
            "AdamC on %s: lr_max %s (from %s), corrected groups %s, tensors per group %s%s",
            type(optimizer).__name__,
            lr_maxes,
            source,
            [i for i, (g, on) in enumerate(zip(groups, enabled, strict=True)) if on and g["weight_decay"] > 0],
            [len(g["params"]) for g in groups],
            f" ({DECAY_SPLIT_PARAM}: {split})" if split else "",
        )
    return optimizer


def register() -> None:
    """Idempotent: after it, ``"type": "AdamC"`` is a DeepSpeed optimizer type."""
    require("deepspeed", "deepspeed", "megatron_adamc.deepspeed.register()")
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime.engine import DeepSpeedEngine

    if ADAMC not in ds_config.DEEPSPEED_OPTIMIZERS:
        ds_config.DEEPSPEED_OPTIMIZERS.append(ADAMC)  # the engine module holds the same list object
    if getattr(DeepSpeedEngine, _PATCHED, False):
        return

    configure_basic = DeepSpeedEngine._configure_basic_optimizer
    configure = DeepSpeedEngine._configure_optimizer

    @functools.wraps(configure_basic)
    def _configure_basic_optimizer(self: Any, model_parameters: Any) -> Any:
        if self.optimizer_name() == ADAMC:
            return _build_adamc(self, model_parameters)
        return configure_basic(self, model_parameters)

    @functools.wraps(configure)
    def _configure_optimizer(self: Any, client_optimizer: Any, model_parameters: Any) -> Any:
        if self._config.optimizer_name == ADAMC:
            if client_optimizer is not None:
                raise AdamCError(
                    "optimizer.type AdamC cannot correct a client optimizer passed to deepspeed.initialize: "
                    "drop optimizer= or set optimizer.type to AdamW"
                )
            refuse_unsupported_step_paths(self)
        return configure(self, client_optimizer, model_parameters)

    DeepSpeedEngine._configure_basic_optimizer = _configure_basic_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer
    setattr(DeepSpeedEngine, _PATCHED, True)
