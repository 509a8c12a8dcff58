"""metrics.jsonl's one owner: non-finite numbers round-trip, a torn last line never blocks a reader or a resume."""

from __future__ import annotations

import math

import pytest

from megatron_adamc.metrics_file import MetricsFile, MetricsFileError

pytestmark = pytest.mark.unit  # make test-fast


def test_round_trip_rows_events_and_non_finite(tmp_path) -> None:
    metrics = MetricsFile(tmp_path)
    metrics.append({"step": 2, "loss": math.nan, "grad_norm": math.inf})
    metrics.append({"step": 1, "loss": 3.5, "grad_norm": -math.inf})
    metrics.append_event("nonfinite", 2, what="loss")
    read = metrics.read(strict=True)
    assert [r["step"] for r in read.rows] == [1, 2]  # sorted by step
    assert math.isnan(read.rows[1]["loss"]) and read.rows[1]["grad_norm"] == math.inf
    assert read.rows[0]["grad_norm"] == -math.inf
    assert read.events == [{"event": "nonfinite", "step": 2, "what": "loss"}]
    assert read.series("loss") == ([1], [3.5])  # non-finite values are left out of a series


def test_torn_last_line_is_dropped_and_truncated(tmp_path) -> None:
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        metrics.append({"step": step, "loss": float(step)})
    with open(metrics.path, "a") as handle:
        handle.write('{"step": 4, "loss": 4.')  # a crash mid-append
    read = metrics.read(strict=True)
    assert [r["step"] for r in read.rows] == [1, 2, 3] and read.torn_lines == 1
    assert metrics.last_row() == {"step": 3, "loss": 3.0}
    assert metrics.truncate(2) == 1  # the torn line and step 3 (redone by the resumed run) go
    assert metrics.path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'


def test_malformed_middle_line_is_an_error_only_when_strict(tmp_path) -> None:
    metrics = MetricsFile(tmp_path)
    metrics.append({"step": 1, "loss": 1.0})
    with open(metrics.path, "a") as handle:
        handle.write("garbage\n")
    metrics.append({"step": 2, "loss": 2.0})
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl:2: not a JSON object"):
        metrics.read(strict=True)
    assert [r["step"] for r in metrics.read().rows] == [1, 2]
    with pytest.raises(MetricsFileError, match="no metrics.jsonl in it"):
        MetricsFile(tmp_path / "nowhere").read(strict=True)
