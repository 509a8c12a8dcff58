"""``megatron-adamc``: one command, one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed args and returning an exit code. Anything below raises a ``MegatronAdamCError``
(``megatron_adamc.errors``); ``main`` prints it as one line and exits with its code, with no traceback. A usage
mistake argparse finds is one line too (no usage dump), and so is Ctrl-C at any moment, imports included.
Before a command runs, every output path it was given is checked (``megatron_adamc.outputs``), so a command
never fails half-way on a path it could have refused up front.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Module names under megatron_adamc.cli; each adds one sub-command (named by its register(), e.g. import-hf).
SUBCOMMANDS = ["train", "tokenizer", "preprocess", "experiment", "slurm", "report", "plan", "export", "import_hf"]

# Every command names its outputs with one of these options; main checks each before the command runs:
# dest -> what the path is ("dir", or a file prefix and the suffixes written after it); (command, dest) overrides.
OUTPUT_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "output_dir": ("dir", ()),  # train, slurm submit, experiment: a run directory (an existing one resumes)
    "output": ("dir", ()),  # export, import-hf, report (export and import-hf refuse a non-empty one themselves)
    "output_prefix": ("prefix", (".bin", ".idx")),  # preprocess: OUT.bin / OUT.idx
}
COMMAND_OUTPUTS = {("tokenizer", "output"): ("prefix", (".model", ".vocab"))}  # tokenizer train: PREFIX.model


class UsageError(Exception):
    """argparse found a usage mistake: reported by ``main`` as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megatron-adamc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)  # sub-parsers inherit _Parser
    for name in SUBCOMMANDS:
        importlib.import_module(f"megatron_adamc.cli.{name}").register(sub)
    return parser


def check_outputs(args: argparse.Namespace) -> None:
    """Each output path of the command: usable, or one ``UserError`` naming the option and the fix."""
    from megatron_adamc.outputs import check_output_dir, check_output_prefix

    for dest, default in OUTPUT_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        kind, suffixes = COMMAND_OUTPUTS.get((args.command, dest), default)
        option = "--" + dest.replace("_", "-")
        if kind == "dir":
            check_output_dir(str(value), option)
        else:
            check_output_prefix(str(value), option, suffixes)


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv``, default ``sys.argv[1:]``) -> its exit code.

    Called as the program itself (``argv`` None: the console script, ``python -m megatron_adamc.cli``), a Ctrl-C that
    ends it exits at once after its one line: interrupted inside an import, the interpreter's own shutdown can hang
    or die on the half-imported module (torch), and nothing is left to clean up (the trainer closed its loader and
    lock on the way out)."""
    code = _main(argv)
    if code == 130 and argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return code


def _main(argv: list[str] | None) -> int:
    try:
        from megatron_adamc.errors import exit_on_interrupt, report_errors

        with exit_on_interrupt(None):  # importing the sub-commands
            parser = build_parser()
            args = parser.parse_args(argv)
    except UsageError as err:
        print(err, file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the sub-commands are imported
        print("megatron-adamc: interrupted", file=sys.stderr, flush=True)
        return 130

    def work() -> int:
        check_outputs(args)
        return args.func(args)

    return report_errors(args.command, work)


if __name__ == "__main__":
    sys.exit(main())
