"""``megatron-adamc``: one command, one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed args and returning an exit code. Anything below raises a ``MegatronAdamCError``
(``megatron_adamc.errors``); ``main`` prints it as one line and exits with its code, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module names under megatron_adamc.cli; each adds one sub-command (named by its register(), e.g. import-hf).
SUBCOMMANDS = ["train", "tokenizer", "preprocess", "experiment", "slurm", "report", "plan", "export", "import_hf"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-adamc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"megatron_adamc.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_adamc.errors import MegatronAdamCError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MegatronAdamCError as err:
        if _is_main_rank():  # under torchrun every rank raises the same error: one line is enough
            print(f"megatron-adamc {args.command}: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        if _is_main_rank():
            print(f"megatron-adamc {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130


def _is_main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
