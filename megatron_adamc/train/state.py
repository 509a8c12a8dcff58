"""What the trainer saves beside DeepSpeed's checkpoint, in one place: ``trainer_state.pt``'s fields and format.

Each component that carries state across a resume (the divergence guard, the tracker, the data position) hands its
``state_dict`` here at a save and gets it back at a resume; nothing else reads the file's keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TrainerState:
    step: int = 0  # the last optimizer step taken
    consumed_samples: int = 0  # the data position: samples the whole world has read
    world_size: int = 1  # ranks that wrote the checkpoint
    global_batch: int = 0  # samples per optimizer step, kept across world-size changes
    identity: dict[str, Any] = field(default_factory=dict)  # what defines the run (train/resume.py)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config that saved it
    guard: dict[str, Any] = field(default_factory=dict)  # DivergenceGuard.state_dict()
    tracker: dict[str, Any] | None = None  # Tracker.state_dict(), None when tracking was off
    weight_norm: float | None = None  # L2 norm of all weights at the save (the guard's weight-growth reference)
    tokenizer: dict[str, Any] | None = None  # path, sha256 and vocabulary of the tokenizer it was trained with

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainerState:
        """The saved dict back as a state; a key this version does not know is an error (a newer writer)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"unknown trainer state field(s) {', '.join(unknown)} (written by a newer version?)")
        return cls(**state)
