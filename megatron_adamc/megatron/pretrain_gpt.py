"""Megatron-LM's ``pretrain_gpt.py`` with AdamC: ``python -m megatron_adamc.megatron.pretrain_gpt <its args> --adamc``.

Megatron-LM's own script runs unchanged (its model provider, datasets, ``pretrain``); three of its public names
are wrapped before it runs:

- ``extra_args_provider`` gains ``--adamc`` on every entry point that takes one (``megatron.training.pretrain``
  up to 0.17, ``megatron.training.arguments.parse_and_validate_args`` from 0.18, and ``parse_args``);
- ``megatron.training.training.get_optimizer_param_scheduler``, looked up at call time by the training setup,
  builds the scheduler with the very same arguments but as ``AdamCParamScheduler`` (with ``--adamc``) or
  ``PlainParamScheduler`` (without: it only logs a resume from an AdamC checkpoint);
- the AdamC scheduler writes its weight decay to Megatron's TensorBoard and W&B writers, next to ``learning-rate``.

Arguments of the form ``@file`` are replaced by the flags in that file (``configs/megatron/*.args``).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import runpy
import shlex
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from megatron_adamc.megatron.megatron_lm import MegatronLMNotFound, locate_megatron_lm
from megatron_adamc.resources import find_file

PROG = "megatron_adamc.megatron.pretrain_gpt"
ADAMC_FLAG = "--adamc"
# TensorBoard / W&B tags, next to Megatron's own 'learning-rate'.
WEIGHT_DECAY_TAG = "adamc-weight-decay"
DECOUPLED_WEIGHT_DECAY_TAG = "adamc-weight-decay-decoupled-lr"

ExtraArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


class PluginError(RuntimeError):
    """A user's mistake in invoking the plugin: printed as one line, exit code 2."""


def add_adamc_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's ``extra_args_provider`` contract: take the parser, add flags, return it."""
    group = parser.add_argument_group(title="AdamC")
    try:
        group.add_argument(
            ADAMC_FLAG,
            action=argparse.BooleanOptionalAction,
            default=False,
            help="Schedule-corrected weight decay: each param group decays by weight_decay * lr_t / max_lr "
            "(Defazio 2025, arXiv 2506.02285). --no-adamc after a config file that sets it gives plain AdamW.",
        )
    except argparse.ArgumentError:
        pass  # a release whose two entry points both pass our provider: the flag is there already
    return parser


def chain_extra_args_providers(first: ExtraArgsProvider | None) -> ExtraArgsProvider:
    """``first`` (e.g. Megatron-LM's ModelOpt flags) and then ``--adamc``."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if first is not None:
            parser = first(parser)
        return add_adamc_args(parser)

    return provider


def with_adamc_flag(entry_point: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Megatron-LM function taking ``extra_args_provider`` so that the flag is always added."""
    signature = inspect.signature(entry_point)

    @functools.wraps(entry_point)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.arguments["extra_args_provider"] = chain_extra_args_providers(bound.arguments.get("extra_args_provider"))
        return entry_point(*bound.args, **bound.kwargs)

    return wrapped


def weight_decay_scalars(param_groups: Sequence[dict], default_peak: float) -> dict[str, float]:
    """The decay of the first decayed group on the default schedule and of the first decoupled-lr one."""
    scalars: dict[str, float] = {}
    for group in param_groups:
        if group.get("wd_mult", 1.0) == 0.0:
            continue
        decoupled = float(group.get("max_lr", default_peak)) != default_peak
        scalars.setdefault(DECOUPLED_WEIGHT_DECAY_TAG if decoupled else WEIGHT_DECAY_TAG, float(group["weight_decay"]))
    return scalars


def scheduler_classes() -> tuple[type, type]:
    """(AdamC, plain) scheduler classes for Megatron-LM; imported late, once Megatron-LM is on sys.path."""
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
    """A drop-in for ``training.get_optimizer_param_scheduler``: Megatron-LM's own function computes the
    arguments (iterations or samples, warmup fraction, WSD, resume flags) and builds our class with them."""
    original = training.get_optimizer_param_scheduler
    if not hasattr(training, "OptimizerParamScheduler"):
        raise PluginError(
            f"{training.__file__} does not build OptimizerParamScheduler by that name; "
            "use a Megatron-LM release checked with this plugin (core_v0.16.1 to main of 2026-08)"
        )
    adamc_cls, plain_cls = scheduler_classes()
    from megatron.training.global_vars import get_args

    @functools.wraps(original)
    def get_optimizer_param_scheduler(optimizer: Any) -> Any:
        stock = training.OptimizerParamScheduler
        training.OptimizerParamScheduler = adamc_cls if getattr(get_args(), "adamc", False) else plain_cls
        try:
            return original(optimizer)
        finally:
            training.OptimizerParamScheduler = stock

    get_optimizer_param_scheduler.adamc_original = original  # type: ignore[attr-defined]
    return get_optimizer_param_scheduler


def install() -> None:
    """Patch Megatron-LM (already importable) before its ``pretrain_gpt.py`` imports the names it uses."""
    import megatron.training
    import megatron.training.arguments as arguments
    import megatron.training.training as training

    if hasattr(training.get_optimizer_param_scheduler, "adamc_original"):
        return  # installed already
    training.get_optimizer_param_scheduler = adamc_scheduler_builder(training)
    entry_points = [
        (megatron.training, "pretrain"),  # what pretrain_gpt.py imports (up to 0.17 it parses the arguments)
        (training, "pretrain"),
        (arguments, "parse_args"),  # also the early parse of inprocess_restart, so --help lists --adamc
        (arguments, "parse_and_validate_args"),  # from 0.18
    ]
    for module, name in entry_points:
        entry_point = getattr(module, name, None)
        if entry_point is not None and "extra_args_provider" in inspect.signature(entry_point).parameters:
            setattr(module, name, with_adamc_flag(entry_point))


def expand_arg_files(argv: Sequence[str]) -> list[str]:
    """Replace each ``@path`` by the flags in that file (shell quoting, ``#`` comments)."""
    expanded: list[str] = []
    for arg in argv:
        if not arg.startswith("@"):
            expanded.append(arg)
            continue
        path = find_file(arg[1:])  # a configs/megatron/*.args path also finds the shipped copy
        if not path.is_file():
            raise PluginError(f"argument file {arg}: {path} does not exist; give the path of a configs/megatron/*.args")
        expanded.extend(shlex.split(path.read_text(), comments=True))
    return expanded


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = expand_arg_files(argv)
        root = locate_megatron_lm()
        sys.path.insert(0, str(root))  # before any megatron import: its megatron.core must win over the wheel's
        try:
            install()
        except ImportError as err:
            raise PluginError(
                f"Megatron-LM at {root} cannot be imported ({err}): install its requirements in this environment"
            ) from err
    except (PluginError, MegatronLMNotFound) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    script = root / "pretrain_gpt.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
