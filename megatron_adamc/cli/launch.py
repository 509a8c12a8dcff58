"""Multi-rank runs that keep the exit-code contract: torchrun's own launcher, with the failed rank's code passed on.

WHY: torchrun's agent turns any rank's non-zero exit into exit 1 plus a ``ChildFailedError`` traceback, so under
``torchrun --nproc-per-node 2 -m megatron_adamc.cli train ...`` a typo, an unwritable output or a refused resume all
read as 1, and job scripts (launch/slurm) cannot tell "fix the input" (2) from "requeue" or "diverged" (3). This
runs the very same elastic agent (``torch.distributed.run``'s parser and ``elastic_launch``: every torchrun option
works, ``PET_*`` variables included), then exits with the code of the rank that failed first, preferring the
project's codes (2 input, 3 diverged, 4 checkpoint, 5 locked, 130 interrupted) over the exits they caused in other
ranks; a rank killed by a signal gives 128 + the signal, as a shell reports it. Nothing is printed but the ranks'
own one line, or, for a failure that printed none (a crash, a kill), one line naming the rank and its code.

Two ways in: ``megatron-adamc train --nproc-per-node N ...`` (standalone, one machine), and
``python -m megatron_adamc.cli.launch [torchrun options] ENTRY ARGS`` as a drop-in for ``torchrun``
(launch/slurm/node.sh uses it).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from megatron_adamc.errors import LAUNCHER_ENV

# The project's exit codes (megatron_adamc.errors), which a rank prints its own one line for.
CONTRACT = (2, 3, 4, 5, 130)


def exit_code(failures: dict[int, Any]) -> tuple[int, int, Any]:
    """(code, rank, failure) to report for ``ChildFailedError.failures`` (global rank -> ProcessFailure)."""
    ordered = sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    ours = [(rank, f) for rank, f in ordered if f.exitcode in CONTRACT]
    rank, failure = (ours or ordered)[0]
    code = failure.exitcode
    return (128 - code if code < 0 else code), rank, failure


def launch(argv: list[str], standalone: bool = False) -> int:
    """Run torchrun's agent with ``argv`` (torchrun's command line without the program name); the exit code."""
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    args = get_args_parser().parse_args(argv)
    if standalone or args.standalone:
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500
    if standalone:
        # Ctrl-C on a terminal reaches every rank itself (one process group): each saves and exits 0, a second
        # aborts (130). The agent must neither take it as a stop nor send the ranks a second one.
        args.signals_to_handle = "SIGTERM,SIGHUP,SIGQUIT"
        signal.signal(signal.SIGINT, lambda *_: None)
    # The agent logs each failure (and a summary) at ERROR: the ranks' own line, or ours below, says it once.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config, entry, entry_args = config_from_args(args)
    os.environ[LAUNCHER_ENV] = "1"  # the ranks leave their one line to us (errors.report_errors)
    try:
        elastic_launch(config=config, entrypoint=entry)(*entry_args)
    except ChildFailedError as err:
        code, rank, failure = exit_code(err.failures)
        message = failure.message if isinstance(failure.message, str) else ""
        if not message.startswith("megatron-adamc "):
            why = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {code}"
            message = f"megatron-adamc launch: error: rank {rank} (pid {failure.pid}) {why}; its output above says why"
        print(message, file=sys.stderr, flush=True)
        return code
    except SignalException as err:
        print(f"megatron-adamc launch: stopped by {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_adamc.cli.launch``: torchrun, with the exit-code contract."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return launch(argv)
    except KeyboardInterrupt:
        print("megatron-adamc launch: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
