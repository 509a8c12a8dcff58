"""``megatron-adamc ARGV`` in the test's own process: for the checks that end before any process group or training
(bad input, refusals, dry runs), where a fresh interpreter would cost seconds to print one line."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Its exit code, stdout and stderr, as ``subprocess.run`` would give them (argparse's exits included)."""
    from megatron_adamc.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())
