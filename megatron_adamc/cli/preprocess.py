"""``megatron-adamc preprocess``: text/JSONL -> Megatron indexed dataset (``OUT.bin``/``OUT.idx``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="tokenize text/JSONL into a Megatron indexed dataset",
        description="Writes OUT.bin/OUT.idx with megatron-core's IndexedDatasetBuilder (readable by Megatron-LM's "
        "--data-path OUT). One document per JSONL line (--json-key) or per plain-text file.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text or .jsonl files")
    parser.add_argument("--tokenizer", required=True, metavar="MODEL", help="PREFIX.model from `tokenizer train`")
    parser.add_argument("--output-prefix", required=True, metavar="OUT", help="writes OUT.bin and OUT.idx")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the eod (eos) id")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_adamc.data.documents import check_inputs
    from megatron_adamc.data.indexed import preprocess
    from megatron_adamc.data.tokenizer import Tokenizer

    inputs = check_inputs(args.input)
    tokenizer = Tokenizer(args.tokenizer)  # loaded before any output is opened: a bad path destroys nothing
    stats = preprocess(
        inputs, tokenizer, args.output_prefix, json_key=args.json_key, workers=args.workers, append_eod=args.append_eod
    )
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens ({stats.dtype}), "
        f"{stats.skipped_empty} empty skipped, {stats.documents_per_s:.1f} docs/s, {stats.tokens_per_s:,.0f} tokens/s"
    )
    return 0
