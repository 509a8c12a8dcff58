"""The project's one error hierarchy, at the bottom: every layer may raise these, nothing here imports the project.

The CLI prints any ``MegatronAdamCError`` as one line and exits with its ``exit_code``, so the code tells a job
script what happened without parsing text: 2 for the user's input (fix it and rerun; nothing was touched), 3 for a
run that diverged (the last good checkpoint is named), 4 for a checkpoint that cannot be loaded or written, 5 for a
run directory another trainer holds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class MegatronAdamCError(Exception):
    """Base class. The message is one line: what is wrong, the field or file it concerns, and the fix."""

    exit_code = 1


class UserError(MegatronAdamCError):
    """Bad input (config, paths, data, flags): nothing was written."""

    exit_code = 2


class ConfigError(UserError):
    """A config value or combination is invalid."""


class DataError(UserError):
    """Bad data input (missing file, wrong tokenizer, bad JSON, too small for its split)."""


class ResumeError(UserError):
    """A rerun on an existing run directory would change what defines the run, or cannot continue it."""


class DivergenceError(MegatronAdamCError):
    """Too many consecutive non-finite (or skipped) steps: the run stopped, its last good checkpoint is named."""

    exit_code = 3


class CheckpointError(MegatronAdamCError):
    """No checkpoint could be loaded, or a save failed (full disk, read-only): the previous one is intact."""

    exit_code = 4


class RunLockedError(MegatronAdamCError):
    """Another live trainer holds the run directory."""

    exit_code = 5


# Set by megatron_adamc.cli.launch for the ranks it starts: it prints the failed rank's line itself (once, whichever
# rank ends first; rank 0 printing could be cut short by the agent ending the ranks after another one's exit).
LAUNCHER_ENV = "MEGATRON_ADAMC_LAUNCHER"


def record_for_launcher(line: str) -> None:
    """Under an elastic agent (torchrun, cli/launch.py), leave the one line in this rank's error file, where the
    agent reads a failed rank's message (torchrun then shows it instead of "error_file: <N/A>")."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"message": line, "timestamp": int(time.time())}, handle)
    except OSError:
        pass


def announce(line: str) -> None:
    """The one line of how a command ended: on rank 0's stderr (every rank raises alike), or left to the launcher."""
    record_for_launcher(line)
    if os.environ.get("RANK", "0") == "0" and os.environ.get(LAUNCHER_ENV) != "1":
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def exit_on_interrupt(command: str | None) -> Iterator[None]:
    """While the command imports its libraries, Ctrl-C ends the process at once with its one line (exit 130).

    WHY: an interrupt inside ``import torch``/``deepspeed`` leaves a half-imported module behind, and libraries that
    catch everything at import time can swallow the KeyboardInterrupt: the run then went on and failed later with a
    RecursionError traceback, or hung at interpreter exit. Nothing has been written at that point, so there is
    nothing to clean up. Main thread only (signal handlers live there); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        announce(f"megatron-adamc{f' {command}' if command else ''}: interrupted")
        sys.stdout.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def report_errors(command: str, work: Callable[[], int]) -> int:
    """Run ``work``: its exit code, or a ``MegatronAdamCError`` as one line on stderr (rank 0 only: under torchrun
    every rank raises the same error) and its code, or Ctrl-C as "interrupted" and 130. How every command ends.

    A file-system error no check foresaw (``OSError``) and ``MemoryError`` are one line too, exit 1, naming the
    path or the fix; ``MEGATRON_ADAMC_TRACEBACK=1`` lets them through with their traceback (for a bug report)."""

    def say(message: str) -> None:
        announce(f"megatron-adamc {command}: {message}")

    try:
        return int(work() or 0)
    except MegatronAdamCError as err:
        say(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except (OSError, MemoryError) as err:
        if os.environ.get("MEGATRON_ADAMC_TRACEBACK") == "1":
            raise
        say(f"error: {describe_unexpected(err)}")
        return 1


def describe_unexpected(err: BaseException) -> str:
    """One line for an ``OSError``/``MemoryError`` that reached the top: what, where, and what to do."""
    if isinstance(err, MemoryError):
        return "out of memory; `megatron-adamc plan` shows what the run needs (lower train.micro_batch_size or seq_len)"
    assert isinstance(err, OSError)
    what = err.strerror or type(err).__name__
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    return f"{what}{f': {where}' if where else ''} (unexpected; set MEGATRON_ADAMC_TRACEBACK=1 for the traceback)"
