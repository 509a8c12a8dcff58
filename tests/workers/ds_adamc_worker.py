"""Runs under torchrun (2 gloo ranks): AdamC, a hand-decayed AdamW reference and plain AdamW on real DeepSpeed engines.

Writes one torch file (rank 0) with, per case, the final FP32 master weights, the lr and applied weight decay of
every step, for the pytest side to compare. One launch per ZeRO set-up amortises DeepSpeed's start-up.
The GPU check (benchmarks/gpu/parity.py) imports ``run_case`` and ``max_rel_diff`` for the same cases on one CUDA rank.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param

import megatron_adamc.deepspeed as mad
from megatron_adamc.core.adamc import APPLIED_KEY
from megatron_adamc.core.decay import corrected_weight_decay

STEPS, RESUME_AT, MICRO_BATCH, WD, LR = 12, 5, 4, 0.5, 1e-2
SCHEDULERS = {
    "cosine": {"type": "WarmupCosineLR", "params": {"total_num_steps": STEPS, "warmup_num_steps": 3}},
    # warmup_max_lr deliberately unlike the optimizer lr: lr_max must come from the scheduler
    "warmup": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-2, "warmup_num_steps": 5, "warmup_type": "linear"},
    },
}
PEAK = {"cosine": LR, "warmup": 2e-2}


def make_model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
        torch.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 8),
    )  # fmt: skip


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(MICRO_BATCH, 16, generator=gen), torch.randn(MICRO_BATCH, 8, generator=gen)


def ds_config(stage: str, optimizer: str, scheduler: str, bf16: bool, torch_adam: bool = False) -> dict:
    zero: dict = {"stage": int(stage[0])}
    if stage.endswith("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
        if zero["stage"] == 3:
            zero["offload_param"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": optimizer, "params": {"lr": LR, "weight_decay": WD, "betas": [0.9, 0.95], "eps": 1e-8}},
        "scheduler": copy.deepcopy(SCHEDULERS[scheduler]),
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if torch_adam:
        cfg["optimizer"]["params"]["torch_adam"] = True
    return cfg


def engine_for(stage: str, optimizer: str, scheduler: str, bf16: bool = False, torch_adam: bool = False):
    model = make_model()
    groups = mad.decay_param_groups(model)
    config = ds_config(stage, optimizer, scheduler, bf16, torch_adam)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return engine


def train(engine, steps: range, hand_decay_peak: float | None = None, hand_from: int = 0) -> dict:
    """Steps the engine; with hand_decay_peak, sets AdamW's weight decay to WD * lr / peak before each step."""
    rank = torch.distributed.get_rank()
    lrs, applied = [], []
    for step in steps:
        x, y = batch(step, rank)
        x, y = x.to(engine.device, dtype=next(engine.module.parameters()).dtype), y.to(engine.device)
        loss = (engine(x).float() - y).pow(2).mean()
        engine.backward(loss)
        groups = engine.optimizer.param_groups
        lrs.append([float(g["lr"]) for g in groups])
        if hand_decay_peak is not None and step >= hand_from:
            for g, base in zip(groups, (WD, 0.0), strict=True):
                g["weight_decay"] = corrected_weight_decay(base, float(g["lr"]), hand_decay_peak)
        engine.step()
        applied.append([float(g.get(APPLIED_KEY, g["weight_decay"])) for g in groups])
        if hand_decay_peak is not None:
            for g, base in zip(groups, (WD, 0.0), strict=True):
                g["weight_decay"] = base
    return {"lrs": lrs, "applied": applied}


def master_weights(engine) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if engine.zero_optimization() or engine.bfloat16_enabled() else None
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ||a - b|| / ||b|| over the tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in a)


def run_case(
    stage: str, optimizer: str, scheduler: str, bf16: bool = False, hand: bool = False, torch_adam: bool = False
) -> dict:
    engine = engine_for(stage, optimizer, scheduler, bf16, torch_adam)
    record = train(engine, range(STEPS), hand_decay_peak=PEAK[scheduler] if hand else None)
    record["weights"] = master_weights(engine)
    record["basic_optimizer"] = type(engine.basic_optimizer).__name__
    return record


def run_resume(stage: str, first: str, then: str, ckpt_root: str) -> dict:
    """`first` for RESUME_AT steps, save, a fresh `then` engine loads and continues to STEPS."""
    ckpt = os.path.join(ckpt_root, f"{stage}-{first}-{then}")
    engine = engine_for(stage, first, "cosine")
    train(engine, range(RESUME_AT))
    engine.save_checkpoint(ckpt, tag="step5")
    del engine
    engine = engine_for(stage, then, "cosine")
    engine.load_checkpoint(ckpt, tag="step5")
    record = train(engine, range(RESUME_AT, STEPS))
    record["weights"] = master_weights(engine)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", required=True)  # 0, 1, 2, 3, 2-offload, 3-offload
    parser.add_argument("--out", required=True)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--mixed-resume", action="store_true")
    parser.add_argument("--torch-adam", action="store_true")
    args = parser.parse_args()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    mad.register()
    results: dict = {}
    for scheduler in SCHEDULERS:
        results[f"adamc/{scheduler}"] = run_case(args.stage, "AdamC", scheduler)
        results[f"reference/{scheduler}"] = run_case(args.stage, "AdamW", scheduler, hand=True)
        results[f"adamw/{scheduler}"] = run_case(args.stage, "AdamW", scheduler)
    if args.bf16:
        results["adamc/cosine/bf16"] = run_case(args.stage, "AdamC", "cosine", bf16=True)
        results["reference/cosine/bf16"] = run_case(args.stage, "AdamW", "cosine", bf16=True, hand=True)
    if args.torch_adam:
        results["adamc/cosine/torch_adam"] = run_case(args.stage, "AdamC", "cosine", torch_adam=True)
        results["reference/cosine/torch_adam"] = run_case(args.stage, "AdamW", "cosine", hand=True, torch_adam=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = [tmp]
        torch.distributed.broadcast_object_list(root, src=0)  # one directory for both ranks
        results["resume/adamc"] = run_resume(args.stage, "AdamC", "AdamC", root[0])
        if args.mixed_resume:
            results["resume/adamw->adamc"] = run_resume(args.stage, "AdamW", "AdamC", root[0])
            engine = engine_for(args.stage, "AdamW", "cosine")
            record = train(engine, range(STEPS), hand_decay_peak=LR, hand_from=RESUME_AT)
            record["weights"] = master_weights(engine)
            results["reference/adamw->adamc"] = record
        torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        torch.save(results, args.out)
    torch.distributed.destroy_process_group()  # a live gloo group can abort the exit (torch 2.13: ~1 in 7 ranks)


if __name__ == "__main__":
    main()
