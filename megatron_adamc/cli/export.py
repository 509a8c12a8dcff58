"""``megatron-adamc export RUN_DIR --format hf --output DIR [--step N]``: a run's checkpoint as a Hugging Face model.

Reads RUN_DIR (run.json, checkpoints/, the run's tokenizer) and writes nothing there. The model config is the
run's (preset plus overrides, as run.json records it), its vocabulary the checkpoint's embedding rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_adamc.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="a run's checkpoint as a Hugging Face model directory (LlamaForCausalLM, or Qwen3 for qk_norm)",
        description="Consolidates the DeepSpeed checkpoint (any ZeRO stage, offload, data-parallel size) to full "
        "fp32 weights and writes safetensors, config.json and the tokenizer, loadable with "
        "AutoModelForCausalLM/AutoTokenizer.from_pretrained(DIR). RUN_DIR is only read.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a `megatron-adamc train` output directory")
    parser.add_argument("--format", required=True, choices=["hf"], help="hf: a Hugging Face transformers directory")
    parser.add_argument("--output", required=True, metavar="DIR", help="a new (or empty) directory")
    parser.add_argument("--step", type=int, metavar="N", help="the checkpoint of step N (default: the latest)")
    parser.add_argument(
        "--tokenizer", metavar="MODEL", help="SentencePiece .model to ship (default: the run's); 'none' for none"
    )
    parser.add_argument(
        "--dtype", default="float32", metavar="float32|bfloat16|float16", help="weight dtype written (default float32)"
    )
    parser.add_argument("--shard-gb", type=float, default=5.0, metavar="GB", help="max safetensors shard (default 5)")
    parser.set_defaults(func=run)


def checkpoint_dir(run_dir: Path, step: int | None) -> Path:
    """The checkpoint to export: ``step_N``, or the newest one that verifies against its manifest."""
    from megatron_adamc.train.checkpointer import verified_checkpoint

    return verified_checkpoint(run_dir, step, log=lambda line: print(line, file=sys.stderr))


def run(args: argparse.Namespace) -> int:
    from megatron_adamc.hf.from_run import export_run, run_config
    from megatron_adamc.hf.hf_config import DTYPES

    if args.shard_gb <= 0:
        raise UserError(f"--shard-gb {args.shard_gb}: must be positive")
    if args.dtype not in DTYPES:  # before the (long) consolidation
        raise UserError(f"--dtype {args.dtype}: use one of {', '.join(DTYPES)}")
    config = run_config(args.run_dir)
    tag_dir = checkpoint_dir(args.run_dir, args.step)
    exported = export_run(config, tag_dir, args.output, args.tokenizer, args.dtype, int(args.shard_gb * 1e9))
    print(
        f"exported {tag_dir} as {exported.architecture} ({exported.num_params / 1e6:,.2f}M parameters, "
        f"{args.dtype}) to {args.output}: {', '.join(exported.files)}"
    )
    return 0
