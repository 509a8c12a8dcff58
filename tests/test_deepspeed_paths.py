"""Every path where DeepSpeed 0.19 steps, on a real one-rank engine in this process (CPU, gloo).

Paths that step through the base optimizer (fp16 dynamic loss scaling, the torch-autocast GradScaler, BF16_Optimizer):
AdamC's FP32 master tensors must equal, bit for bit, DeepSpeed's "AdamW" on the same path whose weight decay the test
sets by hand to lambda * lr_t / lr_max before every step, and the decay AdamC applied must be that value on every step
that was taken. An overflow is injected at step INF_STEP (the loss times inf), so each path really skips a step (the
BF16_Optimizer skips on a non-finite gradient norm). Paths that step with something else are refused at initialize
with one line naming the key (megatron_adamc/deepspeed/step_paths.py). What needs a GPU: tests/workers/ds_paths_gpu.py.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from workers.ds_adamc_worker import LR, WD, batch, make_model

import megatron_adamc.deepspeed as mad
from megatron_adamc.core.adamc import APPLIED_KEY
from megatron_adamc.core.decay import AdamCError, corrected_weight_decay

STEPS, INF_STEP, MICRO_BATCH = 8, 3, 4
SCHEDULER = {"type": "WarmupCosineLR", "params": {"total_num_steps": STEPS, "warmup_num_steps": 2}}

# path -> (config additions, the wrapper DeepSpeed steps through, whether a step is skipped at INF_STEP)
PATHS = {
    "fp16-dynamic-loss-scale-zero0": ({"fp16": {"enabled": True, "initial_scale_power": 8}}, "FP16_Optimizer", True),
    "fp16-dynamic-loss-scale-zero2": (
        {"fp16": {"enabled": True, "initial_scale_power": 8}, "zero_optimization": {"stage": 2}},
        "DeepSpeedZeroOptimizer",
        True,
    ),
    "torch-autocast-gradscaler-zero0": ({"torch_autocast": {"enabled": True, "dtype": "fp16"}}, "FusedAdam", True),
    "bf16-optimizer": (
        {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1}},
        "BF16_Optimizer",
        True,  # a non-finite gradient norm skips the step here too
    ),
}

REFUSED = {
    "zero_optimization.offload_optimizer.ratio": {
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}
    },
    "zero_optimization.zenflow": {
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu"},
            "zenflow": {"topk_ratio": 0.1, "update_interval": 2, "full_warm_up_rounds": 0, "overlap_step": False},
        }
    },
    "zero_optimization.offload_optimizer.super_offload": {
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "super_offload": True}}
    },
}


def ds_config(optimizer: str, extra: dict) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_clipping": 1.0,
        "optimizer": {"type": optimizer, "params": {"lr": LR, "weight_decay": WD, "betas": [0.9, 0.95], "eps": 1e-8}},
        "scheduler": copy.deepcopy(SCHEDULER),
        "steps_per_print": 10**9,
    }
    return cfg | copy.deepcopy(extra)


def run(optimizer: str, extra: dict, hand_decay: bool) -> dict:
    model = make_model()
    groups = mad.decay_param_groups(model)
    engine = mad.initialize(model=model, model_parameters=groups, config=ds_config(optimizer, extra))[0]
    taken: list[int] = []
    engine.basic_optimizer.register_step_post_hook(lambda *_: taken.append(len(lrs)))
    lrs, applied = [], []
    dtype = next(engine.module.parameters()).dtype
    for step in range(STEPS):
        x, y = batch(step, 0)
        loss = (engine(x.to(dtype)).float() - y).pow(2).mean()
        if step == INF_STEP:
            loss = loss * float("inf")
        engine.backward(loss)
        groups = engine.basic_optimizer.param_groups
        lrs.append(float(groups[0]["lr"]))
        if hand_decay:
            for group, base in zip(groups, (WD, 0.0), strict=True):
                group["weight_decay"] = corrected_weight_decay(base, float(group["lr"]), LR)
        engine.step()
        applied.append(float(groups[0].get(APPLIED_KEY, groups[0]["weight_decay"])))
        if hand_decay:
            for group, base in zip(groups, (WD, 0.0), strict=True):
                group["weight_decay"] = base
    master = [p.detach().float().clone() for g in engine.basic_optimizer.param_groups for p in g["params"]]
    return {
        "wrapper": type(engine.optimizer).__name__,
        "lrs": lrs,
        "applied": applied,
        "taken": sorted(set(taken)),
        "master": master,
    }


@pytest.fixture(scope="module")
def results(single_rank_dist):
    cache: dict[str, dict] = {}

    def get(path: str) -> dict:
        if path not in cache:
            extra = PATHS[path][0]
            cache[path] = {"adamc": run("AdamC", extra, False), "reference": run("AdamW", extra, True)}
        return cache[path]

    return get


@pytest.mark.parametrize("path", list(PATHS))
def test_adamc_equals_hand_decayed_adamw_on_the_path(results, path):
    r = results(path)
    _, wrapper, skips = PATHS[path]
    adamc, ref = r["adamc"], r["reference"]
    assert adamc["wrapper"] == ref["wrapper"] == wrapper  # the path under test really ran
    expected_taken = [s + 1 for s in range(STEPS) if not (skips and s == INF_STEP)]
    assert adamc["taken"] == ref["taken"] == expected_taken  # the injected overflow skipped exactly that step
    assert adamc["lrs"] == ref["lrs"]
    for a, b in zip(adamc["master"], ref["master"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", list(PATHS))
def test_applied_decay_on_every_step_taken(results, path):
    r = results(path)["adamc"]
    stepped = set(r["taken"])
    last = WD  # before the first step the group holds lambda itself
    for step, (lr, applied) in enumerate(zip(r["lrs"], r["applied"], strict=True)):
        if step + 1 in stepped:
            assert applied == pytest.approx(WD * lr / LR, rel=1e-12, abs=0)
            last = applied
        else:
            assert applied == last  # a skipped step applies nothing and changes nothing


@pytest.mark.parametrize("key", list(REFUSED))
def test_paths_adamc_cannot_correct_are_refused_at_initialize(single_rank_dist, key):
    model = make_model()
    cfg = ds_config("AdamC", REFUSED[key])
    with pytest.raises(AdamCError, match="^" + re.escape(key)) as err:
        mad.initialize(model=model, model_parameters=mad.decay_param_groups(model), config=cfg)
    assert "\n" not in str(err.value)
