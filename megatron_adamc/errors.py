"""The project's one error hierarchy, at the bottom: every layer may raise these, nothing here imports the project.

The CLI prints any ``MegatronAdamCError`` as one line and exits with its ``exit_code``, so the code tells a job
script what happened without parsing text: 2 for the user's input (fix it and rerun; nothing was touched), 3 for a
run that diverged (the last good checkpoint is named), 4 for a checkpoint that cannot be loaded or written, 5 for a
run directory another trainer holds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


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


def report_errors(command: str, work: Callable[[], int]) -> int:
    """Run ``work``: its exit code, or a ``MegatronAdamCError`` as one line on stderr (rank 0 only: under torchrun
    every rank raises the same error) and its code, or Ctrl-C as "interrupted" and 130. How every command ends."""
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        return int(work() or 0)
    except MegatronAdamCError as err:
        if main_rank:
            print(f"megatron-adamc {command}: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        if main_rank:
            print(f"megatron-adamc {command}: interrupted", file=sys.stderr, flush=True)
        return 130
