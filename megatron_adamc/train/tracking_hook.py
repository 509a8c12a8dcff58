"""The norm tracker (``tracking.*``) as a component of the training loop: it arms its hooks before a tracked step,
adds its numbers to the step's row after it, and reports spike alarms as one readable line each (the full record
goes to metrics.jsonl as a ``spike`` event)."""

from __future__ import annotations

import math
from typing import Any

from megatron_adamc.metrics_file import GRAD_NORM, LOSS
from megatron_adamc.tracking.tracker import Tracker
from megatron_adamc.train.component import Component
from megatron_adamc.train.metrics import MetricsLogger


class TrackingHook(Component):
    def __init__(self, engine: Any, config: Any, model: Any, logger: MetricsLogger) -> None:
        self.tracker = Tracker(engine, config, model)
        self.logger = logger

    def begin_step(self, step: int, last: bool) -> None:
        self.tracker.begin_step(step, last)

    def end_step(self, step: int, last: bool, record: dict[str, Any]) -> None:
        loss = record[LOSS] if math.isfinite(record[LOSS]) else None
        record.update(self.tracker.end_step(step, loss=loss, grad_norm=record[GRAD_NORM]))
        for event in self.tracker.pop_events():
            fields = {k: v for k, v in event.items() if k not in ("event", "step")}
            self.logger.event("spike", step, spike_line(step, fields), **fields)

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state)

    def close(self) -> None:
        self.tracker.close()


def spike_line(step: int, event: dict[str, Any]) -> str:
    """``spike at step 12: grad_norm 3.2 (z 4.1); moved most by step 13: layers.1.mlp.fc2.weight x1.8, ...``"""
    line = f"spike at step {step}: {event['kind']} {event['value']:.4g} (z {event['zscore']:.2f})"
    moved = event.get("top_layers") or []
    if moved:
        parts = [f"{m['metric']} x{m['value'] / m['previous']:.3g}" if m["previous"] else m["metric"]
                 for m in moved[:3]]  # fmt: skip
        line += f"; moved most by step {event['layers_step']}: {', '.join(parts)}"
    return line
