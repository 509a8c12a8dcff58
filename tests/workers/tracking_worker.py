"""One rank of the tracker test: real DeepSpeed engines on every stage, tracked norms against gathered tensors.

Run by tests/test_tracking_zero.py as two processes (gloo). For each config it trains a few steps; on tracked
steps it also gathers the full FP32 weights (before and after the step) and gradients with ``safe_get_full_*``
and compares every per-parameter metric with the same metric computed on the full tensors. Rank 0 writes the
largest relative errors per config to the JSON file named by argv[1].
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

import deepspeed  # noqa: E402
from deepspeed import comm as dist  # noqa: E402
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402
from tiny_model import TinyLM  # noqa: E402
from torch._utils import _unflatten_dense_tensors  # noqa: E402

import megatron_adamc.deepspeed as mad  # noqa: E402
from megatron_adamc.core.adamc import APPLIED_KEY, ENABLED_KEY, LR_MAX_KEY  # noqa: E402
from megatron_adamc.core.theory import adam_normalized_update_ratio, kosson_normalized_update_ratio  # noqa: E402
from megatron_adamc.tracking import Tracker, TrackingConfig  # noqa: E402

LR_MAX, WD, CLIP = 1e-2, 0.1, 0.05

CONFIGS = {
    "stage0_fp32": {"stage": 0, "bf16": False, "optimizer": "AdamW"},
    "stage0_bf16": {"stage": 0, "bf16": True, "optimizer": "AdamC"},
    "zero1_bf16": {"stage": 1, "bf16": True, "optimizer": "AdamW"},
    "zero1_bf16_fp32acc": {"stage": 1, "bf16": True, "optimizer": "AdamC", "fp32_acc": True},
    "zero2_bf16": {"stage": 2, "bf16": True, "optimizer": "AdamC", "spike": True},
    "zero3_bf16": {"stage": 3, "bf16": True, "optimizer": "AdamC"},
    "zero2_offload": {"stage": 2, "bf16": True, "optimizer": "AdamC", "offload": True},
    "zero3_offload": {"stage": 3, "bf16": True, "optimizer": "AdamW", "offload": True},
}


def ds_config(spec: dict) -> dict:
    zero: dict = {"stage": spec["stage"]}
    if spec.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if spec["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = 50  # some params persistent, some gathered
    config = {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
        "optimizer": {"type": spec["optimizer"], "params": {"lr": LR_MAX, "weight_decay": WD, "betas": [0.9, 0.95]}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": LR_MAX, "warmup_num_steps": 6, "warmup_type": "linear"},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": spec["bf16"]},
    }
    if spec.get("fp32_acc"):
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def full_fp32(engine, param: torch.nn.Parameter) -> torch.Tensor:
    """The gathered FP32 master. Stage 0 keeps it whole on every rank: in FP16_Optimizer's flat copies (bf16
    weights, which safe_get_full_fp32_param does not cover), or the parameter itself (fp32)."""
    value = safe_get_full_fp32_param(param)
    if value is None and isinstance(engine.optimizer, FP16_Optimizer):
        for params, flat in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups_flat, strict=True):
            for lp, hp in zip(params, _unflatten_dense_tensors(flat, params), strict=True):
                if lp is param:
                    value = hp
    return (param.detach() if value is None else value).float().clone()


def rel(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b) / max(abs(b), 1e-12)


def run(name: str, spec: dict) -> dict:
    model = TinyLM()
    if spec["bf16"]:
        model = model.to(torch.bfloat16)
    groups = mad.decay_param_groups(model, weight_decay=WD)
    engine, _, _, _ = mad.initialize(model=model, model_parameters=groups, config=ds_config(spec))
    config = TrackingConfig(enabled=True, interval=2, activations=True, low_precision=True, fp8_amax_history=4)
    tracker = Tracker(engine, config)
    rank = dist.get_rank()
    errors: dict[str, float] = {}
    info: dict = {
        "kind": tracker.layout.kind,
        "wrapper": type(engine.optimizer).__name__,
        "basic": type(engine.basic_optimizer).__name__,
        "checked_steps": [],
    }
    reference_acts: dict[str, list] = {}

    def ref_hook(module_name: str):
        def hook(module, inputs, output):
            if tracker._armed:
                out = output.detach().float()
                entry = reference_acts.setdefault(module_name, [0.0, 0])
                entry[0] += float(out.square().sum())
                entry[1] += out.numel()

        return hook

    for module_name, module in engine.module.named_modules():
        if module_name.endswith(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")):
            module.register_forward_hook(ref_hook(module_name))

    def bump(key: str, value: float) -> None:
        errors[key] = max(errors.get(key, 0.0), value)

    steps = 14 if spec.get("spike") else 5
    gen = torch.Generator().manual_seed(1234 + rank)
    for step in range(steps):
        tokens = torch.randint(0, 37, (3, 12), generator=gen)
        tracker.begin_step(step)
        tracked = tracker._armed
        reference_acts.clear()
        loss = engine(tokens)
        engine.backward(loss)
        if tracked:
            names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
            params = dict(engine.module.named_parameters())
            grads = {n: safe_get_full_grad(params[n]).float().clone() for n in names}
            before = {n: full_fp32(engine, params[n]) for n in names}
            lrs = [float(g["lr"]) for g in engine.optimizer.param_groups]
            logits = {}
            for module_name, module in engine.module.named_modules():
                if module_name.endswith(".attn") and isinstance(module.last_max_logit, torch.Tensor):
                    value = module.last_max_logit.detach().float().reshape(1).clone()
                    dist.all_reduce(value, op=dist.ReduceOp.MAX)
                    logits[module_name[: -len(".attn")]] = float(value)
        engine.step()
        loss_value = float(loss.detach())
        if spec.get("spike") and step == 11:
            loss_value = 1e3  # an untracked step: the event is completed from step 12
        metrics = tracker.end_step(step, loss=loss_value, grad_norm=engine.get_global_grad_norm())
        if not tracked:
            assert not any(k.startswith("weight_norm/") for k in metrics), "untracked step returned norms"
            continue
        after = {n: full_fp32(engine, params[n]) for n in names}
        info["checked_steps"].append(step)
        for n in names:
            w, g, u = before[n].norm().item(), grads[n].norm().item(), (after[n] - before[n]).norm().item()
            bump("weight_norm", rel(metrics[f"weight_norm/{n}"], w))
            bump("grad_norm", rel(metrics[f"grad_norm/{n}"], g))
            bump("update_norm", rel(metrics[f"update_norm/{n}"], u))
            if w > 0:
                bump("grad_weight_ratio", rel(metrics[f"grad_weight_ratio/{n}"], g / w))
                cos = torch.dot(before[n].reshape(-1), grads[n].reshape(-1)).item() / (w * g)
                bump("cos_weight_grad_abs", abs(metrics[f"cos_weight_grad/{n}"] - cos))
            index = tracker.layout.group_of_row[names.index(n)]
            group = engine.optimizer.param_groups[index]
            if group["weight_decay"] > 0:
                lr_max = group.get(LR_MAX_KEY) if group.get(ENABLED_KEY, False) else None
                if spec["optimizer"] == "AdamC":
                    assert lr_max == LR_MAX, f"AdamC lr_max not stamped: {lr_max}"
                    if spec["stage"] != 3:  # ZeRO-3 steps sub-groups one by one; AdamC's record is not per call
                        assert abs(group[APPLIED_KEY] - WD * lrs[index] / LR_MAX) < 1e-12, (name, group[APPLIED_KEY])
                    assert group["weight_decay"] == WD, "AdamC left lambda_t in the group"
                # Adam groups get the Adam forms of the normalized update, never the SGD form of ||g||/||x||.
                assert f"predicted_ratio/{n}" not in metrics
                bump("normalized_update_ratio", rel(metrics[f"normalized_update_ratio/{n}"], u / (w * lrs[index])))
                expected = adam_normalized_update_ratio(WD, lrs[index], lr_max)
                bump("predicted_adam_ratio", rel(metrics[f"predicted_adam_ratio/{n}"], expected))
                expected = kosson_normalized_update_ratio(WD, lrs[index], 0.9, lr_max)
                bump("predicted_kosson_ratio", rel(metrics[f"predicted_kosson_ratio/{n}"], expected))
            else:
                assert f"predicted_adam_ratio/{n}" not in metrics
            if spec["bf16"]:
                changed = after[n] != before[n]
                stale = changed & (after[n].bfloat16() == before[n].bfloat16())
                expected = stale.sum().item() / max(changed.sum().item(), 1)
                bump("bf16_stale_frac_abs", abs(metrics[f"bf16_stale_frac/{n}"] - expected))
            bump("fp8_weight_amax", rel(metrics[f"fp8/weight/amax/{n}"], before[n].abs().max().item()))
            bump("fp8_grad_amax", rel(metrics[f"fp8/grad/amax/{n}"], grads[n].abs().max().item()))
            if step > 0:
                assert f"fp8/weight/overflow_frac/{n}" in metrics, "fp8 stats missing on the second tracked step"
        total = math.sqrt(sum(grads[n].double().square().sum().item() for n in names))
        bump("global_grad_norm", rel(metrics["tracking/grad_norm"], total))
        if engine.get_global_grad_norm() is not None:
            bump("global_grad_norm", rel(metrics["tracking/grad_norm"], float(engine.get_global_grad_norm())))
        for module_name, (sumsq, count) in reference_acts.items():
            t = torch.tensor([sumsq, float(count)], dtype=torch.float64)
            dist.all_reduce(t)
            bump("act_rms", rel(metrics[f"act_rms/{module_name}"], math.sqrt(t[0].item() / t[1].item())))
        for layer, value in logits.items():
            bump("max_attn_logit", rel(metrics[f"max_attn_logit/{layer}"], value))
        info["clip_factor"] = metrics["tracking/clip_factor"]
        info["n_logits"] = len(logits)
        info["n_acts"] = len(reference_acts)
    info["events"] = tracker.pop_events()
    tracker.close()
    return {"errors": errors, "info": info}


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    only = os.environ.get("TRACKING_CONFIGS")
    names = only.split(",") if only else list(CONFIGS)
    results = {}
    for name in names:
        results[name] = run(name, CONFIGS[name])
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle, indent=1, default=str)
    torch.distributed.destroy_process_group()  # a live gloo group can abort the exit (torch 2.13: ~1 in 7 ranks)


if __name__ == "__main__":
    main()
