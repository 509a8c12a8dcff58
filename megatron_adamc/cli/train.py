"""``megatron-adamc train --config FILE --output-dir DIR [--set key=value ...] [--nproc-per-node N]``: Llama
pretraining on DeepSpeed. With ``--nproc-per-node N`` it starts N ranks on this machine itself (torchrun's agent,
``cli/launch.py``) and exits with the failed rank's code, so the exit codes are the same on one rank or many."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from megatron_adamc.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="pretrain a Llama with DeepSpeed (resumes from DIR/checkpoints)")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/train/llama_tiny.yaml")
    parser.add_argument("--output-dir", required=True, help="run directory (metrics, checkpoints)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="start N ranks on this machine (what torchrun --nproc-per-node N does, with the exit codes kept)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_adamc.errors import exit_on_interrupt

    if args.nproc_per_node is not None:
        return launch_ranks(args)
    from megatron_adamc.extras import require

    require("deepspeed", "train", "megatron-adamc train (the DeepSpeed trainer)")
    require("megatron.core", "train", "megatron-adamc train (its megatron-core datasets)")
    with exit_on_interrupt("train"):  # the heavy imports (torch, DeepSpeed): Ctrl-C here exits at once
        import deepspeed  # noqa: F401 - imported by preflight anyway; here, under the handler

        from megatron_adamc.train.trainer import train_from_config

    return train_from_config(args.config, Path(args.output_dir), args.overrides)


def launch_ranks(args: argparse.Namespace) -> int:
    from megatron_adamc.cli.launch import launch

    if args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node {args.nproc_per_node}: must be at least 1")
    if "LOCAL_RANK" in os.environ:
        raise UserError("--nproc-per-node: this process is already a rank of a launcher (torchrun?); drop the option")
    entry = ["-m", "megatron_adamc.cli", "train", "--config", str(args.config), "--output-dir", str(args.output_dir)]
    for item in args.overrides:
        entry += ["--set", item]
    return launch([f"--nproc-per-node={args.nproc_per_node}", *entry], standalone=True)
