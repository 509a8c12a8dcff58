"""Step 1, parity: AdamC against DeepSpeed's own AdamW with the decay set by hand, on DeepSpeed's kernel.

DeepSpeed's FusedAdam is JIT-built first (CUDA on a GPU, its CPU build here), timed, once for every later step.
Then the cases of tests/workers/ds_adamc_worker.py (a small MLP, 12 steps of WarmupCosineLR, decay and no-decay
groups) on one rank: ZeRO 0-3, fp32 and bf16; the final FP32 master weights of AdamC and of the hand-decayed AdamW
must agree to 1e-6 relative (same arithmetic in the same order: bitwise in practice), and plain AdamW must differ by
far more. Last, one optimizer step of AdamC vs AdamW on the same kernel at 1B parameters
(benchmarks/optimizer_step.py), interleaved, median: AdamC adds two dict writes per group, so the ratio is ~1.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from gpu.common import REPO, StepContext, fmt, table
from megatron_adamc.ports import free_port

RTOL = 1e-6  # tests/test_deepspeed_adamc.py's tolerance; measured bitwise on the CPU
MIN_ADAMW_GAP = 1e-3  # plain AdamW must differ from AdamC by far more than RTOL, or the comparison proves nothing
DECAY_RTOL = 1e-12  # the applied decay is lambda * lr / lr_max computed in float64: exact up to rounding


def sizes(ctx: StepContext) -> dict[str, Any]:
    if ctx.cpu:
        return {"stages": ["0", "3"] if ctx.quick else ["0", "1", "2", "3"], "params": 1e6, "repeats": 20}
    return {"stages": ["0", "1", "2", "3"], "params": 1e9, "repeats": 20}


def build_fused_adam(ctx: StepContext) -> bool:
    from deepspeed.accelerator import get_accelerator

    ctx.save(fused_adam_built=None)  # building: a kill now leaves "not built" for the later steps
    start = time.perf_counter()
    try:
        get_accelerator().create_op_builder("FusedAdamBuilder").load(verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure is a finding to record, not a crash
        ctx.save(fused_adam_built=False, fused_adam_error=f"{type(err).__name__}: {str(err).strip()[-600:]}")
        return False
    ctx.save(fused_adam_built=True, fused_adam_build_s=round(time.perf_counter() - start, 1))
    return True


def init_one_rank(cuda: bool) -> None:
    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def decay_rule_error(record: dict[str, Any], peak: float, wd: float) -> float:
    """Largest relative gap between the decay AdamC applied to the decayed group and wd * lr_t / peak."""
    worst = 0.0
    for lrs, applied in zip(record["lrs"], record["applied"], strict=True):
        want = wd * lrs[0] / peak
        worst = max(worst, abs(applied[0] - want) / max(abs(want), 1e-30))
    return worst


def parity_cases(ctx: StepContext, torch_adam: bool) -> list[dict[str, Any]]:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from workers.ds_adamc_worker import PEAK, WD, max_rel_diff, run_case

    cases: list[dict[str, Any]] = []
    for precision in ("fp32", "bf16"):
        for stage in sizes(ctx)["stages"]:
            if ctx.left() < 15:
                ctx.save(parity_skipped=f"out of time before ZeRO-{stage} {precision}")
                return cases
            bf16 = precision == "bf16"
            adamc = run_case(stage, "AdamC", "cosine", bf16=bf16, torch_adam=torch_adam)
            ref = run_case(stage, "AdamW", "cosine", bf16=bf16, hand=True, torch_adam=torch_adam)
            case = {
                "zero": int(stage),
                "precision": precision,
                "kernel": adamc["basic_optimizer"],
                "max_rel_diff": max_rel_diff(adamc["weights"], ref["weights"]),
                "bitwise": all(torch.equal(adamc["weights"][k], ref["weights"][k]) for k in adamc["weights"]),
                "same_lrs": adamc["lrs"] == ref["lrs"],
                "decay_rule_error": decay_rule_error(adamc, PEAK["cosine"], WD),
            }
            if stage == "0" and not bf16:  # the control: plain AdamW, once
                plain = run_case(stage, "AdamW", "cosine", torch_adam=torch_adam)
                case["adamw_gap"] = max_rel_diff(plain["weights"], adamc["weights"])
            cases.append(case)
            ctx.save(cases=cases)
            print(f"ZeRO-{stage} {precision}: max rel diff {case['max_rel_diff']:.2e}", flush=True)
    return cases


def step_cost(ctx: StepContext, fused: bool) -> dict[str, Any]:
    import optimizer_step  # benchmarks/optimizer_step.py: gpu_check.py's folder is on sys.path
    import torch

    cuda = not ctx.cpu
    kernels = optimizer_step.kernels(cuda and fused)
    name = next(iter(kernels)) if fused else "torch AdamW fused"
    size = sizes(ctx)
    if ctx.cpu:
        torch.set_num_threads(1)  # optimizer_step.py's default: the steadiest on a shared machine
    t_w, t_c = optimizer_step.bench(kernels[name], int(size["params"]), size["repeats"], "cuda" if cuda else "cpu")
    return {
        "kernel": name,
        "params": size["params"],
        "adamw_ms": t_w * 1e3,
        "adamc_ms": t_c * 1e3,
        "ratio": t_c / t_w,
        "hook_cost_us": optimizer_step.hook_cost_us(),
    }


def run(ctx: StepContext) -> bool:
    import torch

    cuda = not ctx.cpu
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    import megatron_adamc.deepspeed as mad

    fused = build_fused_adam(ctx)
    init_one_rank(cuda)
    mad.register()
    cases = parity_cases(ctx, torch_adam=not fused)
    expected = "FusedAdam" if fused else "AdamW"  # DeepSpeed's "AdamW": FusedAdam, or torch's with torch_adam
    ok = fused and bool(cases) and "parity_skipped" not in ctx.figures
    for case in cases:
        case["ok"] = (
            case["max_rel_diff"] <= RTOL
            and case["same_lrs"]
            and case["decay_rule_error"] <= DECAY_RTOL
            and case.get("adamw_gap", 1.0) >= MIN_ADAMW_GAP
            and case["kernel"] == expected
        )
        ok = ok and case["ok"]
    ctx.save(cases=cases, rtol=RTOL, min_adamw_gap=MIN_ADAMW_GAP)
    if ctx.left() > 10:
        ctx.save(step_cost=step_cost(ctx, fused))
    return ok


def summary(record: dict[str, Any]) -> str:
    cases = record.get("cases", [])
    parts = []
    if "fused_adam_build_s" in record:
        parts.append(f"FusedAdam built in {record['fused_adam_build_s']} s")
    elif record.get("fused_adam_error"):
        parts.append(f"FusedAdam build FAILED: {record['fused_adam_error'][-160:]}")
    if cases:
        worst = max(c["max_rel_diff"] for c in cases)
        bitwise = sum(c["bitwise"] for c in cases)
        parts.append(f"{len(cases)} cases, worst rel diff {worst:.1e} (<= {RTOL:g}), {bitwise} bitwise")
    cost = record.get("step_cost")
    if cost:
        parts.append(f"AdamC/AdamW step {cost['ratio']:.3f} at {cost['params']:.0e} params")
    return "; ".join(parts)


def markdown(record: dict[str, Any]) -> str:
    rows = [
        [f"ZeRO-{c['zero']}", c["precision"], c["kernel"], c["max_rel_diff"], c["bitwise"], c.get("adamw_gap"), c["ok"]]
        for c in record.get("cases", [])
    ]
    text = table(["stage", "precision", "kernel", "AdamC vs hand-set AdamW", "bitwise", "plain AdamW gap", "ok"], rows)
    cost = record.get("step_cost")
    if cost:
        text += "\n\n" + table(
            ["kernel", "params", "AdamW step (ms)", "AdamC step (ms)", "AdamC/AdamW", "hook cost (us, CPU)"],
            [[cost["kernel"], f"{cost['params']:.0e}", cost["adamw_ms"], cost["adamc_ms"], cost["ratio"],
              fmt(cost["hook_cost_us"])]],
        )  # fmt: skip
    return text
