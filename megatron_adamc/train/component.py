"""How a part of the training loop plugs in: one interface, so that adding a component touches one place.

A component owns its config section and its decisions (when to act: ``due``). The trainer calls, at every step,
``begin_step`` before the first forward and ``end_step`` after the update, with the step's record (the metrics row
being built: a component adds its numbers to it); ``state_dict``/``load_state_dict`` carry what a resume needs
(``TrainerState`` names the field); ``close`` runs once, however the loop ends.
"""

from __future__ import annotations

from typing import Any


def due(step: int, interval: int, last: bool) -> bool:
    """Every ``interval`` steps, and always at the last step of the run."""
    return last or step % interval == 0


class Component:
    """Override what the component needs; the defaults do nothing."""

    def begin_step(self, step: int, last: bool) -> None:
        """Before the step's first forward."""

    def end_step(self, step: int, last: bool, record: dict[str, Any]) -> None:
        """After the update: add to ``record`` (the step's metrics row), decide and act."""

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the state a checkpoint saved."""

    def close(self) -> None:
        """Release what the component holds; runs once, however the loop ends."""
