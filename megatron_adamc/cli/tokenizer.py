"""``megatron-adamc tokenizer train``: a SentencePiece BPE model (byte fallback) from text or JSONL files."""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    actions = parser.add_subparsers(dest="tokenizer_command", required=True)
    train = actions.add_parser(
        "train",
        help="train a BPE model with byte fallback",
        description="Writes PREFIX.model and PREFIX.vocab. A .jsonl input holds one JSON object per line (the text "
        "under --json-key); any other file is one document.",
    )
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text or .jsonl files")
    train.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    train.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text)")
    train.add_argument(
        "--input-sentence-size",
        type=int,
        default=300_000,
        metavar="N",
        help="lines sampled for training (default 300000); the cap that keeps training fast",
    )
    train.add_argument("--threads", type=int, default=2, help="trainer threads (default 2)")
    train.add_argument("--seed", type=int, default=1234)
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from megatron_adamc.data.documents import check_inputs, iter_documents
    from megatron_adamc.data.tokenizer import train_tokenizer

    inputs = check_inputs(args.input)
    start = time.perf_counter()
    tokenizer = train_tokenizer(
        iter_documents(inputs, args.json_key),
        args.output,
        args.vocab_size,
        input_sentence_size=args.input_sentence_size,
        num_threads=args.threads,
        seed=args.seed,
    )
    print(f"wrote {tokenizer.path} (vocab {tokenizer.vocab_size}) in {time.perf_counter() - start:.1f}s")
    return 0
