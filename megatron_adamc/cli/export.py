"""``megatron-adamc export RUN_DIR --format hf --output DIR [--step N]``: a run's checkpoint as a Hugging Face model.

Reads RUN_DIR (run.json, checkpoints/, the run's tokenizer) and writes nothing there. The model config is the
run's (preset plus overrides, as run.json records it), its vocabulary the checkpoint's embedding rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_adamc.errors import CheckpointError, UserError


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
    from megatron_adamc.hf import consolidate_fp32, export_hf
    from megatron_adamc.hf.hf_config import DTYPES

    if args.shard_gb <= 0:
        raise UserError(f"--shard-gb {args.shard_gb}: must be positive")
    if args.dtype not in DTYPES:  # before the (long) consolidation
        raise UserError(f"--dtype {args.dtype}: use one of {', '.join(DTYPES)}")
    train_config = _run_config(args.run_dir)
    tag_dir = checkpoint_dir(args.run_dir, args.step)
    state = consolidate_fp32(tag_dir, _group_names(train_config))
    model_config = _model_config(train_config, state, tag_dir)
    tokenizer = _tokenizer_path(train_config, args.tokenizer, model_config.vocab_size)
    exported = export_hf(state, model_config, args.output, tokenizer, args.dtype, int(args.shard_gb * 1e9))
    print(
        f"exported {tag_dir} as {exported.architecture} ({exported.num_params / 1e6:,.2f}M parameters, "
        f"{args.dtype}) to {args.output}: {', '.join(exported.files)}"
    )
    return 0


def _run_config(run_dir: Path):
    from pydantic import ValidationError

    from megatron_adamc.train.config import TrainConfig, one_line

    path = run_dir / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no run.json; pass a `megatron-adamc train` output directory")
    try:
        return TrainConfig.model_validate(json.loads(path.read_text())["config"])
    except (ValueError, KeyError, TypeError) as err:  # JSON errors and pydantic's ValidationError are ValueErrors
        why = one_line(err) if isinstance(err, ValidationError) else str(err)
        raise UserError(f"{path}: not a run record this version reads ({why})") from None


def _group_names(train_config) -> list[list[str]]:
    """Names of the trainer's optimizer param groups, in order (a ZeRO-0 bf16 checkpoint stores masters by group)."""
    import torch

    from megatron_adamc.hf.consolidate import group_names
    from megatron_adamc.model import Llama, LlamaConfig

    try:
        config = LlamaConfig.from_preset(train_config.model.preset, **train_config.model.overrides())
    except ValueError as err:
        raise UserError(f"run.json model: {str(err).splitlines()[0]}") from None
    with torch.device("meta"):
        model = Llama(config)
    return group_names(model, train_config.optimizer.exclude_embeddings_from_decay)


def _model_config(train_config, state: dict, tag_dir: Path):
    from megatron_adamc.model import LlamaConfig

    overrides = train_config.model.overrides()
    if "vocab_size" not in overrides:  # the trainer took it from the tokenizer: the embedding has that many rows
        if "tok_embeddings.weight" not in state:
            raise CheckpointError(f"{tag_dir}: no tok_embeddings.weight: not a checkpoint of this project's Llama")
        overrides["vocab_size"] = int(state["tok_embeddings.weight"].shape[0])
    return LlamaConfig.from_preset(train_config.model.preset, **overrides)


def _tokenizer_path(train_config, given: str | None, vocab_size: int) -> str | None:
    from megatron_adamc.data.tokenizer import Tokenizer

    if given is not None:
        return None if given == "none" else given
    data = train_config.data
    if data.default_corpus:
        path, field = os.path.join(os.path.expanduser(data.cache_dir), "tokenizer.model"), "data.cache_dir"
    else:
        path, field = os.path.expanduser(data.tokenizer), "data.tokenizer"
    if not (os.path.isfile(path) or os.path.isfile(path + ".model")):
        raise UserError(
            f"run.json {field}: the run's tokenizer {path} is gone; pass --tokenizer MODEL (or --tokenizer none)"
        )
    pieces = Tokenizer(path, field=field).vocab_size
    if "vocab_size" not in train_config.model.overrides() and pieces != vocab_size:
        raise UserError(
            f"run.json {field}: {path} now has {pieces} pieces, the model was trained with {vocab_size} (rebuilt "
            f"since?); pass the run's tokenizer with --tokenizer MODEL"
        )
    return path
