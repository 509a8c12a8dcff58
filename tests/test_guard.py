"""The divergence guard: its decisions, and that a skipped update really leaves the FP32 master weights and Adam
moments bitwise unchanged on every ZeRO stage (real DeepSpeed engines, in this process)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_adamc.train.build import master_tensors, optimizer_state_is_finite
from megatron_adamc.train.guard import LOSS_SPIKE, NONFINITE_GRAD, NONFINITE_LOSS, DivergenceGuard, poison

pytestmark = pytest.mark.unit  # make test-fast


def test_guard_decisions_and_streak() -> None:
    guard = DivergenceGuard(max_bad_steps=2, spike_ratio=1.5, spike_skip_window=3)
    assert guard.pre_update(math.nan) == NONFINITE_LOSS and guard.pre_update(math.inf) == NONFINITE_LOSS
    for loss in (4.0, 4.0, 4.0):
        assert guard.pre_update(loss) is None  # the window is not full yet: no spike decisions
        assert guard.post_update(loss, None, skipped_by_deepspeed=False) is None
    assert guard.pre_update(5.9) is None and guard.pre_update(6.1) == LOSS_SPIKE  # 1.5 x the mean 4.0
    assert guard.post_update(6.1, LOSS_SPIKE, False) == LOSS_SPIKE and not guard.diverged
    assert guard.post_update(4.0, None, skipped_by_deepspeed=True) == NONFINITE_GRAD and guard.diverged
    assert guard.skipped_total == 2 and list(guard.window) == [4.0, 4.0, 4.0]  # bad losses stay out of the mean
    restored = DivergenceGuard(2, 1.5, 3)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    assert guard.post_update(4.1, None, False) is None and guard.consecutive_bad == 0


def _engine(stage: int):
    import megatron_adamc.deepspeed as mad
    from megatron_adamc.config.train import TrainConfig
    from megatron_adamc.train.build import build_engine

    config = TrainConfig.model_validate({"optimizer": {"torch_adam": True}})
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    ds = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamC", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
    }  # fmt: skip
    mad.register()
    return build_engine(config, model, ds)


def _state(engine) -> list[torch.Tensor]:
    return [t.detach().clone() for t in master_tensors(engine)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_poisoned_step_is_skipped_and_changes_nothing(single_rank_dist, stage) -> None:
    engine = _engine(stage)
    x, y = torch.randn(2, 8), torch.randn(2, 4)

    def step(bad: bool) -> None:
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(poison(loss) if bad else loss)
        engine.step()

    step(bad=False)
    before, skipped = _state(engine), engine.skipped_steps
    step(bad=True)
    assert engine.skipped_steps == skipped + 1
    after = _state(engine)
    assert len(after) == len(before) >= 3 and all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert optimizer_state_is_finite(engine)
    step(bad=False)  # and training goes on
    assert engine.skipped_steps == skipped + 1
    assert not all(torch.equal(a, b) for a, b in zip(_state(engine), before, strict=True))
    master_tensors(engine)[0].data.view(-1)[0] = math.nan
    assert not optimizer_state_is_finite(engine)
