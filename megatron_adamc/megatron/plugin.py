"""AdamC in Megatron-LM with no wrapper and no code line: ``install()`` patches four of Megatron-LM's public names.

``megatron_adamc.autoload`` calls ``install()`` when Megatron-LM's ``megatron.training`` package has executed (the
first import of it, by ``pretrain_gpt.py``, ``pretrain_mamba.py`` or any script using ``megatron.training``), in
every process of an installed megatron-adamc. ``python -m megatron_adamc.megatron.pretrain_gpt`` calls it by hand.

- ``arguments.add_megatron_arguments`` (looked up by ``parse_args`` at call time): the parser also gets ``--adamc``,
  ``--adamc-exclude``, ``--adamc-track-interval``, ``--adamc-track-dir``, checked right after parsing
  (``flags.validate``) on every parse path (``initialize_megatron``, ``parse_and_validate_args``, ``parse_args``);
- ``training.get_megatron_optimizer_config``: with ``--adamc``, its ``config_overrides`` gain the exclusion
  (``groups.py``), so excluded params get groups of their own marked ``adamc: False``;
- ``training.get_optimizer_param_scheduler`` (looked up at call time): Megatron-LM's own function computes the
  arguments (iterations or samples, warmup fraction, WSD, resume flags) and builds ``AdamCParamScheduler`` (with
  ``--adamc``) or ``PlainParamScheduler`` (without: it logs and records a resume from an AdamC checkpoint) with them;
- ``training.train_step`` (looked up by ``train`` at call time): with ``--adamc-track-interval N``, the per-layer
  tracker (``tracking/megatron_tracker.py``) around it.

Bad input is one line and exit code 2 on every rank (``flags.exit_with``), never a traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from megatron_adamc.core.decay import AdamCError
from megatron_adamc.megatron.flags import add_adamc_args, exit_with, validate
from megatron_adamc.megatron.megatron_lm import PluginError

logger = logging.getLogger(__name__)
# TensorBoard / W&B tags, next to Megatron's own 'learning-rate'.
WEIGHT_DECAY_TAG = "adamc-weight-decay"
DECOUPLED_WEIGHT_DECAY_TAG = "adamc-weight-decay-decoupled-lr"
_MARK = "adamc_original"


class _State:
    matcher: Any = None  # the exclusion matcher of this process's optimizer build
    tracker: Any = None


def weight_decay_scalars(param_groups: Sequence[dict], default_peak: float) -> dict[str, float]:
    """The decay of the first decayed group on the default schedule and of the first decoupled-lr one."""
    scalars: dict[str, float] = {}
    for group in param_groups:
        if group.get("wd_mult", 1.0) == 0.0 or not group.get("adamc", True):
            continue
        decoupled = float(group.get("max_lr", default_peak)) != default_peak
        scalars.setdefault(DECOUPLED_WEIGHT_DECAY_TAG if decoupled else WEIGHT_DECAY_TAG, float(group["weight_decay"]))
    return scalars


def _wrap(original: Callable, make: Callable[[Callable], Callable]) -> Callable:
    wrapped = functools.wraps(original)(make(original))
    setattr(wrapped, _MARK, original)
    return wrapped


def with_adamc_args(add_megatron_arguments: Callable) -> Callable:
    """``add_megatron_arguments`` plus AdamC's flags, and a check of them right after the parser parses."""

    def make(original: Callable) -> Callable:
        def add(parser: Any, *args: Any, **kwargs: Any) -> Any:
            parser = add_adamc_args(original(parser, *args, **kwargs))
            parse_known_args = parser.parse_known_args

            def checked(*p_args: Any, **p_kwargs: Any) -> Any:
                namespace, extras = parse_known_args(*p_args, **p_kwargs)
                try:
                    validate(namespace)
                except AdamCError as err:
                    exit_with(err)
                return namespace, extras

            parser.parse_known_args = checked
            return parser

        return add

    return _wrap(add_megatron_arguments, make)


@functools.cache
def scheduler_classes() -> tuple[type, type]:
    """(AdamC, plain) scheduler classes for Megatron-LM; imported late, once Megatron-LM is importable."""
    from megatron.training.global_vars import get_args, get_tensorboard_writer, get_wandb_writer

    from megatron_adamc.megatron.scheduler import AdamCParamScheduler, PlainParamScheduler

    class LoggingAdamCParamScheduler(AdamCParamScheduler):
        """Logs lambda_t at Megatron's TensorBoard interval, at the iteration Megatron logs the lr it just set."""

        def step(self, increment: int) -> None:
            super().step(increment)
            args = get_args()
            iteration = getattr(args, "curr_iteration", None)  # set by the training loop only
            if not increment or iteration is None:
                return
            iteration += 1  # the loop logs after its `iteration += 1`; this step ends that iteration
            if iteration % max(1, getattr(args, "tensorboard_log_interval", 1)):
                return
            scalars = weight_decay_scalars(self.optimizer.param_groups, self.max_lr)
            writer, wandb_writer = get_tensorboard_writer(), get_wandb_writer()
            for tag, value in scalars.items():
                if writer is not None:
                    writer.add_scalar(tag, value, iteration)
            if wandb_writer is not None and scalars:
                wandb_writer.log(scalars, iteration)

    return LoggingAdamCParamScheduler, PlainParamScheduler


def adamc_scheduler_builder(training: ModuleType) -> Callable[[Any], Any]:
    """A drop-in for ``training.get_optimizer_param_scheduler`` choosing the class by ``--adamc``."""
    if not hasattr(training, "OptimizerParamScheduler"):
        raise PluginError(
            f"{training.__file__} does not build OptimizerParamScheduler by that name; "
            "use a Megatron-LM release checked with this plugin (core_v0.16.1 to main of 2026-12)"
        )

    def make(original: Callable) -> Callable:
        def get_optimizer_param_scheduler(optimizer: Any) -> Any:
            from megatron.training.global_vars import get_args

            from megatron_adamc.megatron.groups import check_matched

            adamc_cls, plain_cls = scheduler_classes()  # imported here: parsing alone must not pull in megatron.core
            adamc = getattr(get_args(), "adamc", False)
            stock = training.OptimizerParamScheduler
            training.OptimizerParamScheduler = adamc_cls if adamc else plain_cls
            try:
                scheduler = original(optimizer)
                if adamc:
                    check_matched(_State.matcher)
                return scheduler
            except AdamCError as err:
                exit_with(err)
            finally:
                training.OptimizerParamScheduler = stock

        return get_optimizer_param_scheduler

    return _wrap(training.get_optimizer_param_scheduler, make)


def with_exclusion(get_config: Callable) -> Callable:
    """``get_megatron_optimizer_config`` whose ``config_overrides`` also exclude ``--adamc-exclude``'s params."""
    from megatron_adamc.megatron.groups import exclusion_overrides, merge_overrides, parse_exclude

    def make(original: Callable) -> Callable:
        def get_megatron_optimizer_config(args: Any) -> Any:
            result = original(args)
            patterns = parse_exclude(getattr(args, "adamc_exclude", "none")) if getattr(args, "adamc", False) else ()
            if not patterns or not isinstance(result, tuple):
                _State.matcher = None
                return result
            config, overrides = result
            extra, _State.matcher = exclusion_overrides(patterns)
            try:
                return config, merge_overrides(overrides, extra)
            except AdamCError as err:
                exit_with(err)

        return get_megatron_optimizer_config

    return _wrap(get_config, make)


def with_tracking(train_step: Callable) -> Callable:
    """``train_step`` with the per-layer tracker around it (built at the first call; off unless asked for)."""

    def make(original: Callable) -> Callable:
        def step(*args: Any, **kwargs: Any) -> Any:
            from megatron.training.global_vars import get_args

            margs = get_args()
            if not getattr(margs, "adamc_track_interval", 0):
                return original(*args, **kwargs)
            if _State.tracker is None:
                _State.tracker = build_tracker(margs, model=args[2], optimizer=args[3])
            iteration = kwargs.get("iteration", None)
            if iteration is None:
                iteration = getattr(margs, "curr_iteration", 0)
            _State.tracker.begin_step(iteration + 1)
            result = original(*args, **kwargs)
            loss = result[0] if isinstance(result, tuple) and result else {}
            extra = {"lr": _default_lr(args[3])}
            if isinstance(loss, dict) and "lm loss" in loss:
                extra["loss"] = float(loss["lm loss"])
            grad_norm = result[5] if isinstance(result, tuple) and len(result) > 5 else None
            if grad_norm is not None:
                extra["grad_norm"] = float(grad_norm)
            _State.tracker.end_step(iteration + 1, grad_norm, extra)
            return result

        return step

    return _wrap(train_step, make)


def _default_lr(optimizer: Any) -> float:
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            return float(group["lr"])
    return float("nan")


def build_tracker(margs: Any, model: Any, optimizer: Any) -> Any:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

    from megatron_adamc.tracking.megatron_tracker import MegatronTracker

    chunks = model if isinstance(model, list) else [model]
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    metrics_dir = margs.adamc_track_dir or getattr(margs, "tensorboard_dir", None) or getattr(margs, "save", None)
    try:
        return MegatronTracker(
            optimizer,
            chunks,
            margs.adamc_track_interval,
            getattr(margs, "clip_grad", 0.0),
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            dp_rank=parallel_state.get_data_parallel_rank(with_context_parallel=True),
            writer_rank=rank == world - 1,
            tensorboard=get_tensorboard_writer(),
            wandb=get_wandb_writer(),
            metrics_dir=metrics_dir,
        )
    except (TypeError, ValueError) as err:
        exit_with(AdamCError(f"--adamc-track-interval: {err}"))


def install() -> None:
    """Patch Megatron-LM (already importable); idempotent."""
    import megatron.training.arguments as arguments
    import megatron.training.training as training

    if hasattr(training.get_optimizer_param_scheduler, _MARK):
        return
    training.get_optimizer_param_scheduler = adamc_scheduler_builder(training)
    arguments.add_megatron_arguments = with_adamc_args(arguments.add_megatron_arguments)
    if hasattr(training, "get_megatron_optimizer_config"):
        training.get_megatron_optimizer_config = with_exclusion(training.get_megatron_optimizer_config)
    training.train_step = with_tracking(training.train_step)


def installed() -> bool:
    import sys

    training = sys.modules.get("megatron.training.training")
    return training is not None and hasattr(training.get_optimizer_param_scheduler, _MARK)
