"""``megatron-adamc import-hf HF_DIR --output DIR``: a local Hugging Face Llama as weights ``train`` continues from."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-hf",
        help="a local Hugging Face Llama directory as project weights plus a train config continuing from them",
        description="Reads HF_DIR (config.json, safetensors weights, optionally tokenizer.model; nothing is "
        "downloaded) and writes DIR/model.safetensors, DIR/tokenizer.model and DIR/train.yaml, whose "
        "checkpoint.init_from and model section continue pretraining from the imported weights.",
    )
    parser.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="a local LlamaForCausalLM (or Qwen3) directory")
    parser.add_argument("--output", required=True, metavar="DIR", help="a new (or empty) directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_adamc.hf import import_hf

    imported = import_hf(args.hf_dir, args.output)
    print(
        f"imported {args.hf_dir} ({imported.architecture}, {imported.num_params / 1e6:,.2f}M parameters) to "
        f"{imported.weights}"
    )
    if imported.tokenizer_note:
        print(f"{imported.tokenizer_note}: set data.tokenizer in {imported.train_config} to a SentencePiece model")
    print(
        f"next: edit data.train in {imported.train_config}, then "
        f"megatron-adamc train --config {imported.train_config} --output-dir RUN_DIR"
    )
    return 0
