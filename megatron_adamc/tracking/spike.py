"""Spike alarm: z-scores of the loss and the global grad norm against the previous ``window`` steps.

A spike is an event, not a metric: it records which layers' norms moved most since the previous tracked step,
which is where one looks first. A grad-norm spike on an untracked step makes the tracker track the next step
and the event is completed from it; a loss spike (the loss may differ between ranks) waits for the next
scheduled tracked step.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from megatron_adamc.core.norms import log_change, zscore

MOVED_KEYS = ("grad_norm/", "update_norm/", "weight_norm/")


class SpikeAlarm:
    def __init__(self, window: int, threshold: float, top_k: int = 5) -> None:
        self.threshold = threshold
        self.top_k = top_k
        self.history: dict[str, deque[float]] = {"loss": deque(maxlen=window), "grad_norm": deque(maxlen=window)}
        self.pending: list[dict[str, Any]] = []
        self._previous: dict[str, float] = {}

    def observe(self, step: int, values: dict[str, float | None]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Z-scores of this step (``spike/<key>_z``) and the spikes found; the values then join the window.

        A spiking value is kept out of the window, so one spike does not hide the next one by inflating the std.
        """
        metrics: dict[str, float] = {}
        spikes: list[dict[str, Any]] = []
        for key, value in values.items():
            if value is None or key not in self.history:
                continue
            z = zscore(value, self.history[key])
            if z is None:
                self.history[key].append(value)
                continue
            metrics[f"spike/{key}_z"] = z
            if z > self.threshold or not math.isfinite(value):
                spikes.append({"event": "spike", "step": step, "kind": key, "value": value, "zscore": z})
            else:
                self.history[key].append(value)
        return metrics, spikes

    def moved_layers(self, metrics: dict[str, float]) -> list[dict[str, Any]]:
        """The ``top_k`` norms with the largest |log(now / previous tracked step)|."""
        moves = []
        for key, value in metrics.items():
            if key.startswith(MOVED_KEYS) and key in self._previous:
                moves.append((log_change(value, self._previous[key]), key, value, self._previous[key]))
        moves.sort(key=lambda item: item[0], reverse=True)
        return [
            {"metric": key, "value": value, "previous": previous, "log_change": change}
            for change, key, value, previous in moves[: self.top_k]
        ]

    def remember(self, metrics: dict[str, float]) -> None:
        self._previous = {k: v for k, v in metrics.items() if k.startswith(MOVED_KEYS)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "pending": list(self.pending),
            "previous": dict(self._previous),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, values in state.get("history", {}).items():
            if key in self.history:
                self.history[key].clear()
                self.history[key].extend(values)
        self.pending = list(state.get("pending", []))
        self._previous = dict(state.get("previous", {}))
