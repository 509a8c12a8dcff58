"""The trainer's small parts, in this process: the saved state's one definition, the interval rule every component
uses, the spike alarm's line."""

from __future__ import annotations

import pytest

from megatron_adamc.train.component import due
from megatron_adamc.train.state import TrainerState
from megatron_adamc.train.tracking_hook import spike_line

pytestmark = pytest.mark.unit  # make test-fast


def test_trainer_state_round_trips_and_refuses_a_field_it_does_not_know() -> None:
    state = TrainerState(step=7, consumed_samples=56, world_size=2, global_batch=8, identity={"model.dim": 64},
                         config={"seed": 1}, guard={"window": [1.0]}, tracker=None)  # fmt: skip
    saved = state.state_dict()
    assert set(saved) == {"step", "consumed_samples", "world_size", "global_batch", "identity", "config", "guard",
                          "tracker", "weight_norm", "tokenizer"}  # fmt: skip
    assert TrainerState.from_state_dict(saved) == state
    with pytest.raises(ValueError, match="unknown trainer state field.*future_field"):
        TrainerState.from_state_dict({**saved, "future_field": 1})


@pytest.mark.parametrize(("interval", "steps", "expected"), [(4, 10, [4, 8, 10]), (1, 3, [1, 2, 3]), (25, 10, [10])])
def test_due_every_interval_and_at_the_last_step(interval: int, steps: int, expected: list[int]) -> None:
    assert [s for s in range(1, steps + 1) if due(s, interval, s == steps)] == expected


def test_spike_line_is_one_readable_line() -> None:
    event = {"kind": "grad_norm", "value": 3.217, "zscore": 4.123, "layers_step": 13,
             "top_layers": [{"metric": "grad_norm/layers.1.mlp.fc2.weight", "value": 1.8, "previous": 1.0},
                            {"metric": "grad_norm/output.weight", "value": 0.5, "previous": 2.0},
                            {"metric": "grad_norm/x", "value": 1.0, "previous": 0.0},
                            {"metric": "grad_norm/fourth", "value": 9.0, "previous": 1.0}]}  # fmt: skip
    line = spike_line(12, event)
    assert "\n" not in line and "{" not in line
    assert line == ("spike at step 12: grad_norm 3.217 (z 4.12); moved most by step 13: "
                    "grad_norm/layers.1.mlp.fc2.weight x1.8, grad_norm/output.weight x0.25, grad_norm/x")  # fmt: skip
    assert spike_line(5, {"kind": "loss", "value": 7.0, "zscore": 3.0}) == "spike at step 5: loss 7 (z 3.00)"
