"""AdamC's DeepSpeed config handling on an in-process one-rank engine: lr_max resolution, a user's own scheduler,
param groups that opt out, and every bad input failing at initialize with one line naming the field."""

from __future__ import annotations

import copy

import pytest
import torch

import megatron_adamc.deepspeed as mad
from megatron_adamc.core.adamc import APPLIED_KEY, LR_MAX_KEY
from megatron_adamc.core.decay import AdamCError
from megatron_adamc.deepspeed.peak_lr import resolve_lr_max

BASE = {
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "AdamC", "params": {"lr": 1e-3, "weight_decay": 0.1}},
    "steps_per_print": 10**9,
}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def config(**changes) -> dict:
    cfg = copy.deepcopy(BASE)
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section]["params"][name] = value
        else:
            cfg[section] = value
    return cfg


def init(cfg: dict, **kwargs):
    m = kwargs.pop("model", None) or model()
    params = kwargs.pop("model_parameters", None) or mad.decay_param_groups(m)
    return mad.initialize(model=m, model_parameters=params, config=cfg, **kwargs)[0]


def step(engine, n: int = 1) -> None:
    for _ in range(n):
        loss = engine(torch.randn(2, 4)).pow(2).mean()
        engine.backward(loss)
        engine.step()


@pytest.mark.parametrize(
    ("scheduler", "params", "expected"),
    [
        (None, {}, [1e-3, 5e-4]),
        ("WarmupLR", {"warmup_max_lr": 3e-3}, [3e-3, 3e-3]),
        ("WarmupLR", {}, [1e-3, 5e-4]),  # WarmupLR's own default: each group's lr
        ("WarmupDecayLR", {"total_num_steps": 10}, [1e-3, 1e-3]),  # its class default warmup_max_lr is 0.001
        ("WarmupCosineLR", {"total_num_steps": 10}, [1e-3, 5e-4]),
        ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": [2e-3, 1e-3]}, [2e-3, 1e-3]),
        ("OneCycleLR", {"max_lr": 4e-3, "total_steps": 10}, [4e-3, 4e-3]),
        ("CosineAnnealingLR", {"T_max": 10}, [1e-3, 5e-4]),
    ],
)
def test_lr_max_is_the_schedulers_peak_per_group(scheduler, params, expected):
    lr_max, _ = resolve_lr_max([1e-3, 5e-4], None, scheduler, params)
    assert lr_max == pytest.approx(expected, rel=1e-12)


def test_explicit_lr_max_wins():
    assert resolve_lr_max([1e-3], 7e-3, "WarmupLR", {"warmup_max_lr": 3e-3})[0] == [7e-3]
    assert resolve_lr_max([1e-3, 1e-3], [7e-3, 6e-3])[0] == [7e-3, 6e-3]


def test_user_scheduler_object_and_opt_out_group(single_rank_dist):
    m = model()
    decay, no_decay = mad.decay_param_groups(m)
    groups = [decay, no_decay, {"params": [], "weight_decay": 0.1}]
    # Split the decay group: the first Linear keeps plain AdamW decay via "adamc": False.
    groups[2]["params"], groups[0]["params"] = groups[0]["params"][:1], groups[0]["params"][1:]
    groups[2]["adamc"] = False
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 4 if s < 4 else 1.0)
    engine = init(config(optimizer__lr_max=1e-3), model=m, model_parameters=groups, lr_scheduler=schedule)
    for _ in range(6):
        lrs = [g["lr"] for g in engine.optimizer.param_groups]
        step(engine)
        applied = [g[APPLIED_KEY] for g in engine.optimizer.param_groups]
        assert applied[0] == pytest.approx(0.1 * lrs[0] / 1e-3, rel=1e-12)
        assert applied[1] == 0.0 and applied[2] == 0.1
    assert [g["weight_decay"] for g in engine.optimizer.param_groups] == [0.1, 0.0, 0.1]  # the base, between steps


def test_warmup_pitfall_lr_max_not_read_from_the_warmed_up_group(single_rank_dist):
    cfg = config(scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": 2e-3, "warmup_num_steps": 5}})
    engine = init(cfg)
    assert engine.optimizer.param_groups[0]["lr"] < 2e-3  # the scheduler already wrote its warmup lr
    assert engine.optimizer.param_groups[0][LR_MAX_KEY] == 2e-3


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (config(optimizer__weight_decay=-0.1), "optimizer.params.weight_decay must be a number >= 0"),
        (config(optimizer__lr_max=0.0), "optimizer.params.lr_max must be a number > 0"),
        (config(optimizer__lr_max=-1e-3), "optimizer.params.lr_max must be a number > 0"),
        (config(optimizer__adam_w_mode=False), "optimizer.params.adam_w_mode must stay true for AdamC"),
        (config(optimizer__lr_max=[1e-3]), "optimizer.params.lr_max has 1 values for 2 param groups"),
    ],
)
def test_bad_input_fails_at_initialize_with_one_line(single_rank_dist, cfg, message):
    with pytest.raises(AdamCError, match=message) as err:
        init(cfg)
    assert "\n" not in str(err.value)


def test_negative_group_weight_decay_is_refused(single_rank_dist):
    m = model()
    with pytest.raises(AdamCError, match=r"param_groups\[0\].weight_decay must be a number >= 0"):
        init(config(), model=m, model_parameters=[{"params": list(m.parameters()), "weight_decay": -1.0}])


def test_client_optimizer_cannot_be_corrected(single_rank_dist):
    m = model()
    with pytest.raises(AdamCError, match="AdamC cannot correct a client optimizer"):
        init(config(), model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))


def test_lr_above_lr_max_says_to_set_lr_max(single_rank_dist):
    cfg = config(
        optimizer__lr_max=1e-3,
        scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": 2e-3, "warmup_num_steps": 2}},
    )
    engine = init(cfg)
    with pytest.raises(AdamCError, match="above lr_max 0.001; set optimizer.params.lr_max"):
        step(engine, 4)


def test_register_is_idempotent_and_adamw_untouched(single_rank_dist):
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    mad.register()
    mad.register()
    assert DEEPSPEED_OPTIMIZERS.count("adamc") == 1
    engine = init(config(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}))
    assert LR_MAX_KEY not in engine.optimizer.param_groups[0]
