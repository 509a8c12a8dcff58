"""The engines behind tests/test_deepspeed_paths.py (CPU) and tests/workers/ds_paths_gpu.py (the GPU check).

``run(optimizer, extra, hand_decay)`` trains the small model of ds_adamc_worker for STEPS steps on the path that the
config additions ``extra`` select, with an overflow injected at step INF_STEP (the loss times inf), and returns the
wrapper DeepSpeed stepped through, the lr and AdamC's applied decay of every step, the steps the base optimizer really
took, and its FP32 master tensors. ``hand_decay``: DeepSpeed's "AdamW" with its weight decay set by hand to
lambda * lr_t / lr_max before every step, the reference. Needs a process group (one rank is enough).
"""

from __future__ import annotations

import copy

import deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from workers.ds_adamc_worker import LR, WD, batch, make_model

import megatron_adamc.deepspeed as mad
from megatron_adamc.core.adamc import APPLIED_KEY
from megatron_adamc.core.decay import corrected_weight_decay

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
    if extra.get("compile", {}).get("deepcompile"):
        engine.compile()
    dtype = next(engine.module.parameters()).dtype
    for step in range(STEPS):
        x, y = batch(step, 0)
        loss = (engine(x.to(engine.device, dtype)).float() - y.to(engine.device)).pow(2).mean()
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
    if engine.zero_optimization_partition_weights():  # ZeRO-3 empties the groups between steps
        master = [safe_get_full_fp32_param(p).float().cpu().clone() for p in engine.module.parameters()]
    else:
        master = [p.detach().float().cpu().clone() for g in engine.basic_optimizer.param_groups for p in g["params"]]
    return {
        "wrapper": type(engine.optimizer).__name__,
        "lrs": lrs,
        "applied": applied,
        "taken": sorted(set(taken)),
        "master": master,
    }


def partial_offload_backup_lr() -> dict:
    """Plain AdamW on ZeRO-3 with offload ratio 0.5: does the backup optimizer's first group follow the schedule?"""
    model = make_model()
    cfg = ds_config("AdamW", REFUSED["zero_optimization.offload_optimizer.ratio"])
    engine = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    backup = getattr(engine.optimizer, "backup_optimizer", None)
    if backup is None:
        return {"error": "no backup_optimizer was built"}
    initial = float(backup.param_groups[0]["lr"])
    for step in range(STEPS):
        x, y = batch(step, 0)
        engine.backward((engine(x.to(engine.device)) - y.to(engine.device)).pow(2).mean())
        engine.step()
    base_lr, backup_lr = float(engine.optimizer.param_groups[0]["lr"]), float(backup.param_groups[0]["lr"])
    return {"base_lr_after": base_lr, "backup_lr_after": backup_lr, "backup_lr_frozen": backup_lr == initial != base_lr}
