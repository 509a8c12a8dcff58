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
    from megatron_adamc.errors import report_errors

    parser = build_parser()
    args = parser.parse_args(argv)
    return report_errors(args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
