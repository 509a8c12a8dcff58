"""``megatron-adamc report RUN_DIR [RUN_DIR ...] [--output DIR]``: plots and a summary of tracked runs."""

from __future__ import annotations

import argparse

from megatron_adamc.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="PNG plots and a markdown summary of runs' metrics.jsonl, overlaid",
        description="Loss, global grad norm, per-layer ||g||/||x|| against the predicted line, weight norms and "
        "FP8 overflow, for one or more run directories (each with a metrics.jsonl).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--output", "-o", default="report", metavar="DIR", help="where to write (default: ./report)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_adamc.tracking.report import ReportError, write_report

    try:
        summary = write_report(args.runs, args.output)
    except ReportError as err:
        raise UserError(str(err)) from err
    print(f"wrote {summary}")
    return 0
