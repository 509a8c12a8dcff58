"""AdamC's command-line flags in Megatron-LM's own parser, and the checks that refuse a wrong run at start-up.

Added by ``add_adamc_args`` to the parser ``megatron.training.arguments.add_megatron_arguments`` builds, so every
Megatron-LM script that parses Megatron's arguments has them (``--help`` lists them under "AdamC"); nothing changes
without ``--adamc``. ``validate`` runs right after Megatron parses, on every rank, before any model is built.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from megatron_adamc.core.decay import LR_MAX_RTOL, AdamCError
from megatron_adamc.megatron.groups import DEFAULT_EXCLUDE, parse_exclude

ADAMC_FLAG = "--adamc"


def add_adamc_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's ``extra_args_provider`` contract: take the parser, add flags, return it (idempotent)."""
    if any(ADAMC_FLAG in action.option_strings for action in parser._actions):
        return parser
    group = parser.add_argument_group(title="AdamC")
    group.add_argument(
        ADAMC_FLAG,
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Schedule-corrected weight decay: each corrected param group decays by weight_decay * lr_t / max_lr "
        "(Defazio 2025, arXiv 2506.02285). --no-adamc after a config file that sets it gives plain AdamW.",
    )
    group.add_argument(
        "--adamc-exclude",
        default=",".join(DEFAULT_EXCLUDE),
        metavar="MODULES",
        help="comma-separated module paths or globs whose params keep the plain decay (default: output_layer, "
        "as Defazio 2025; 'none' corrects every decayed group)",
    )
    group.add_argument(
        "--adamc-track-interval",
        type=int,
        default=0,
        metavar="N",
        help="per-layer weight/grad/update norms and steady-state ratios on the FP32 main params every N "
        "iterations, to TensorBoard/W&B and metrics.jsonl (0: off; works with --no-adamc too)",
    )
    group.add_argument(
        "--adamc-track-dir",
        default=None,
        metavar="DIR",
        help="where metrics.jsonl goes (default: --tensorboard-dir, else --save)",
    )
    return parser


def _peak_violation(init_lr: float, peak: float | None, min_lr: float | None, warmup: bool, style: str) -> str | None:
    if peak is None or peak <= 0:
        return None
    if warmup and init_lr > peak * (1 + LR_MAX_RTOL):
        return f"--lr-warmup-init {init_lr:g}"
    if style != "constant" and min_lr is not None and min_lr > peak * (1 + LR_MAX_RTOL):
        return f"its min lr {min_lr:g}"
    return None


def validate(args: Any) -> None:
    """Raise ``AdamCError`` (one line) for what AdamC would silently get wrong; called right after parsing."""
    interval = getattr(args, "adamc_track_interval", 0) or 0
    if interval < 0:
        raise AdamCError(f"--adamc-track-interval must be >= 0 (got {interval}): 0 turns tracking off")
    if not getattr(args, "adamc", False):
        return
    args.adamc_exclude = ",".join(parse_exclude(args.adamc_exclude)) or "none"  # checked, normalized
    if getattr(args, "optimizer_cuda_graph", False):
        raise AdamCError(
            "--adamc with --optimizer-cuda-graph: the captured optimizer reads weight_decay once, at capture, so "
            "AdamC's per-step decay would freeze at its warmup value; drop one of the two flags"
        )
    if not (getattr(args, "weight_decay", 0.0) or getattr(args, "end_weight_decay", None)):
        return
    warmup = bool(
        getattr(args, "lr_warmup_iters", 0) or getattr(args, "lr_warmup_samples", 0) or args.lr_warmup_fraction
    )
    style = getattr(args, "lr_decay_style", "linear")
    init_lr = float(getattr(args, "lr_warmup_init", 0.0) or 0.0)
    groups = [("--lr", args.lr, args.min_lr)]
    if getattr(args, "decoupled_lr", None) is not None:
        decoupled_min = args.decoupled_min_lr if args.decoupled_min_lr is not None else args.min_lr
        groups.append(("--decoupled-lr", args.decoupled_lr, decoupled_min))
    for flag, peak, min_lr in groups:
        culprit = _peak_violation(init_lr, peak, min_lr, warmup, style)
        if culprit:
            raise AdamCError(
                f"{flag} {peak:g} is the peak of its param groups but {culprit} is above it: AdamC would decay them by "
                f"more than lambda; keep the schedule's lr at or below {flag}"
            )


def exit_with(err: Exception, prog: str = "megatron-adamc") -> None:
    """One line on stderr (rank 0 only: every rank hits the same error), exit code 2, no traceback."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    sys.exit(getattr(err, "exit_code", 2))
