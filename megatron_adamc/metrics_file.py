"""``metrics.jsonl``: a run's numbers, one JSON object per line. This module is its only reader and writer.

Rows carry ``step`` and metrics; events carry ``event`` (a kind: ``spike``, ``nonfinite``, ``skipped``, ``resume``,
...) and the step they happened at. JSON has no NaN or infinity, so NaN is written as null and +-inf as the strings
"inf"/"-inf"; ``read`` turns them back. A crash mid-append leaves a torn last line: readers drop it, and a resuming
trainer truncates it away (``truncate``) with a line in the log, so one torn write never blocks a resume.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_adamc.errors import UserError

FILE_NAME = "metrics.jsonl"

# Keys of every trainer row (tracking adds per-parameter keys of its own, see tracking/).
STEP = "step"
TOKENS = "tokens"
LOSS = "loss"
LR = "lr"
WEIGHT_DECAY = "weight_decay"
GRAD_NORM = "grad_norm"
TOKENS_PER_S = "tokens_per_s"
STEP_TIME_S = "step_time_s"
DATA_WAIT_S = "data_wait_s"
VAL_LOSS = "val_loss"
MFU = "mfu"
PEAK_MEMORY_GB = "peak_memory_gb"
SKIPPED_STEPS = "skipped_steps"  # updates not applied so far (non-finite, overflow, spike guard)
EVENT = "event"


class MetricsFileError(UserError):
    """A metrics file that cannot be read (not a run directory, or a malformed line before the last)."""


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def decode_number(value: Any) -> Any:
    """The inverse of the encoding for one value: null -> NaN, "inf"/"-inf" -> +-inf."""
    if value is None:
        return math.nan
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def _parse(line: str) -> dict[str, Any] | None:
    """One line as a record, or None for anything else (a torn write, a foreign line)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def encode_line(record: dict[str, Any]) -> str:
    return json.dumps(_encode(record)) + "\n"


@dataclass
class Metrics:
    """What a metrics file holds: rows sorted by step, events in file order, and how many torn lines were dropped."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    torn_lines: int = 0

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the rows whose ``key`` is a finite number."""
        steps, values = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps.append(row[STEP])
                values.append(float(value))
        return steps, values

    def last_step(self) -> int:
        return self.rows[-1][STEP] if self.rows else 0


class MetricsFile:
    """A run's ``metrics.jsonl``; ``path`` is the file or the run directory holding it."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.path = path / FILE_NAME if path.is_dir() or path.suffix != ".jsonl" else path

    def exists(self) -> bool:
        return self.path.is_file()

    def append(self, record: dict[str, Any]) -> None:
        """One row (or event). Written with one ``write`` so a crash can tear at most this line."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(encode_line(record))

    def append_event(self, kind: str, step: int, /, **fields: Any) -> dict[str, Any]:
        record = {EVENT: kind, STEP: step, **fields}
        self.append(record)
        return record

    def read(self, strict: bool = False) -> Metrics:
        """Rows and events, non-finite numbers decoded. A torn LAST line is dropped (counted in ``torn_lines``);
        a malformed line before it is an error when ``strict``, else skipped (a run still writing)."""
        out = Metrics()
        if not self.path.is_file():
            if strict:
                raise MetricsFileError(f"{self.path.parent}: no {FILE_NAME} in it; pass a run directory of the trainer")
            return out
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                if number == len(lines) or not strict:
                    out.torn_lines += 1
                    continue
                raise MetricsFileError(f"{self.path}:{number}: not a JSON object; fix or delete that line")
            record = {k: decode_number(v) if k != EVENT else v for k, v in record.items()}
            if record.get(EVENT):
                out.events.append(record)
            elif STEP in record:
                out.rows.append(record)
        out.rows.sort(key=lambda row: row[STEP])
        return out

    def last_row(self) -> dict[str, Any] | None:
        """The last complete row, read from the file's tail (cheap while a run is writing)."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(max(0, handle.seek(0, 2) - 65536))
                lines = handle.read().decode(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            record = _parse(line)
            if record is not None and STEP in record and not record.get(EVENT):
                return {k: decode_number(v) for k, v in record.items()}
        return None

    def truncate(self, last_step: int) -> int:
        """Keep what was logged up to ``last_step`` (a resumed run redoes the rest); drop torn lines. Atomic.
        Returns the number of torn lines dropped, for the caller to log."""
        if not self.path.is_file():
            return 0
        kept, torn = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                torn += 1
                continue
            if record.get(STEP, 0) <= last_step:
                kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)
        return torn
