"""``megatron-adamc``: one command, one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed args and returning an exit code. A user's mistake raises ``UserError`` (or
``AdamCError``); ``main`` prints it as one line and exits 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module names under megatron_adamc.cli; each adds one sub-command.
SUBCOMMANDS = ["train", "tokenizer", "preprocess", "experiment", "slurm", "report"]


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-adamc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"megatron_adamc.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_adamc.core.decay import AdamCError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, AdamCError) as err:
        print(f"megatron-adamc {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
