"""AdamC for Megatron-Bridge: one line in a recipe, ``cfg = enable_adamc(cfg)``, or its two config fields.

Bridge's training loop builds megatron-core's ``OptimizerParamScheduler`` in ``megatron/bridge/training/optim.py``
(``_get_scheduler``, from ``cfg.optimizer`` and ``cfg.scheduler``) and its param groups from
``cfg.optimizer_config_override_provider`` (a ``ConfigContainer`` field meant for exactly such per-group overrides).
So AdamC lives in those two places of the config:

- ``cfg.scheduler`` becomes ``AdamCSchedulerConfig``: Bridge's ``SchedulerConfig`` plus ``adamc: bool = True`` and
  ``adamc_exclude`` (default ``["output_layer"]``), so Bridge's own overrides reach them (``scheduler.adamc=false``,
  ``scheduler.adamc_exclude=[output_layer,embedding]`` on the command line or in the YAML file) and the run's saved
  config records them;
- ``cfg.optimizer_config_override_provider`` becomes ``AdamCConfigOverrideProvider``: Bridge's default provider plus
  the exclusion, as megatron-core overrides (``groups.py``).

``install()`` (run by the start-up hook when ``megatron.bridge.training.optim`` is first imported, and by
``enable_adamc``) wraps ``_get_scheduler``, looked up at call time by ``setup_optimizer``: with ``scheduler.adamc`` it
builds ``AdamCParamScheduler`` with the very arguments Bridge computed. Tested against megatron-bridge 0.3.1 (the
newest release for Python 3.11 and megatron-core 0.16); source read for 0.6.2 (the same ``_get_scheduler``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.bridge.training.config import OptimizerConfigOverrideProvider, SchedulerConfig

from megatron_adamc.core.decay import AdamCError
from megatron_adamc.megatron.groups import (
    DEFAULT_EXCLUDE,
    check_matched,
    exclusion_overrides,
    merge_overrides,
    parse_exclude,
)
from megatron_adamc.megatron.scheduler import AdamCParamScheduler

_MARK = "adamc_original"


class _State:
    matcher: Any = None


@dataclasses.dataclass(kw_only=True)
class AdamCSchedulerConfig(SchedulerConfig):
    """Bridge's scheduler config with AdamC's two settings (``adamc=False`` is Bridge's own scheduler)."""

    adamc: bool = True
    """Schedule-corrected weight decay, lambda_t = lambda * lr_t / max_lr of each corrected param group."""

    adamc_exclude: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    """Module paths or globs whose params keep the plain decay (Defazio 2025 excludes the output layer); []: none."""


@dataclasses.dataclass
class AdamCConfigOverrideProvider(OptimizerConfigOverrideProvider):
    """Bridge's default overrides (no decay for biases and 1-D params, decoupled lr) plus AdamC's exclusion."""

    def build_config_overrides(self, context: Any) -> Any:
        overrides = super().build_config_overrides(context)
        scheduler = context.scheduler_config
        _State.matcher = None
        if not getattr(scheduler, "adamc", False):
            return overrides
        extra, _State.matcher = exclusion_overrides(parse_exclude(list(scheduler.adamc_exclude) or "none"))
        return merge_overrides(overrides if overrides is not None else {}, extra)


def enable_adamc(cfg: Any, exclude: Any = DEFAULT_EXCLUDE) -> Any:
    """AdamC for a Bridge ``ConfigContainer`` (a recipe's ``cfg``); returns it. ``exclude``: as ``--adamc-exclude``."""
    install()
    patterns = list(parse_exclude(exclude if exclude else "none"))
    scheduler = cfg.scheduler
    if isinstance(scheduler, AdamCSchedulerConfig):
        scheduler.adamc, scheduler.adamc_exclude = True, patterns
    else:
        values = {f.name: getattr(scheduler, f.name) for f in dataclasses.fields(SchedulerConfig) if f.init}
        new = AdamCSchedulerConfig(**values, adamc=True, adamc_exclude=patterns)
        for f in dataclasses.fields(SchedulerConfig):
            if not f.init:  # derived by finalize() (lr_warmup_steps, ...): keep what is there
                setattr(new, f.name, getattr(scheduler, f.name))
        cfg.scheduler = new
    provider = cfg.optimizer_config_override_provider
    if type(provider) is OptimizerConfigOverrideProvider:
        cfg.optimizer_config_override_provider = AdamCConfigOverrideProvider()
    elif not isinstance(provider, AdamCConfigOverrideProvider):
        raise AdamCError(
            f"cfg.optimizer_config_override_provider is a custom {type(provider).__name__}: derive it from "
            "megatron_adamc.megatron.bridge.AdamCConfigOverrideProvider so that the exclusion reaches the groups"
        )
    return cfg


def install() -> None:
    """Wrap ``megatron.bridge.training.optim._get_scheduler``; idempotent."""
    import megatron.bridge.training.optim as optim

    if hasattr(optim._get_scheduler, _MARK):
        return
    original = optim._get_scheduler

    def _get_scheduler(optimizer_config: Any, scheduler_config: Any, optimizer: Any) -> Any:
        if not getattr(scheduler_config, "adamc", False):
            return original(optimizer_config, scheduler_config, optimizer)
        if getattr(optimizer_config, "optimizer_cuda_graph", False):
            raise AdamCError(
                "scheduler.adamc with optimizer.optimizer_cuda_graph: the captured optimizer reads weight_decay once, "
                "so AdamC's per-step decay would freeze; turn one of them off"
            )
        stock = optim.OptimizerParamScheduler
        optim.OptimizerParamScheduler = AdamCParamScheduler
        try:
            scheduler = original(optimizer_config, scheduler_config, optimizer)
        finally:
            optim.OptimizerParamScheduler = stock
        check_matched(_State.matcher, "scheduler.adamc_exclude")
        return scheduler

    setattr(_get_scheduler, _MARK, original)
    optim._get_scheduler = _get_scheduler
