"""``megatron-adamc train --config FILE --output-dir DIR [--set key=value ...]``: Llama pretraining on DeepSpeed."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="pretrain a Llama with DeepSpeed (resumes from DIR/checkpoints)")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/train/llama_tiny.yaml")
    parser.add_argument("--output-dir", required=True, type=Path, help="run directory (metrics, checkpoints)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_adamc.extras import require
    from megatron_adamc.train.trainer import train_from_config

    require("deepspeed", "train", "megatron-adamc train (the DeepSpeed trainer)")
    require("megatron.core", "train", "megatron-adamc train (its megatron-core datasets)")

    return train_from_config(args.config, args.output_dir, args.overrides)
