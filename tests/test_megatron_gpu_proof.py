"""The CPU-checkable half of the GPU proof (benchmarks/gpu/megatron_proof.py): its closed-form schedule is megatron-
core's, its reference AdamW step reproduces a running AdamW's step from the captured state bitwise, and its comparison
accepts the decay rule that was used and rejects the other one by far more than its tolerance. The capture itself
and Megatron's DistributedOptimizer step run on the GPU check only (megatron-core allocates them on CUDA)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu import megatron_proof as proof  # noqa: E402

from megatron_adamc.megatron.scheduler import AdamCParamScheduler  # noqa: E402


def scheduler(cls, optimizer):
    return cls(
        optimizer, init_lr=0.0, max_lr=proof.LR, min_lr=proof.MIN_LR, lr_warmup_steps=proof.WARMUP * proof.GBS,
        lr_decay_steps=proof.DECAY * proof.GBS, lr_decay_style="cosine", start_wd=proof.WD, end_wd=proof.WD,
        wd_incr_steps=proof.DECAY * proof.GBS, wd_incr_style="constant",
    )  # fmt: skip


def test_the_closed_form_schedule_is_megatrons() -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
    stock = scheduler(OptimizerParamScheduler, optimizer)
    for iteration in range(proof.DECAY + 3):
        assert proof.schedule_lr(iteration) == pytest.approx(stock.get_lr(optimizer.param_groups[0]), rel=1e-12)
        stock.step(proof.GBS)


def captured_run(adamc: bool) -> list[dict]:
    """megatron-format groups (a decayed matrix, an excluded head, a wd_mult 0 gain) under AdamC's or the stock
    scheduler and torch AdamW, the proof's capture done by hand at the proof step."""
    torch.manual_seed(0)
    body, head = (torch.nn.Parameter(torch.randn(16, 16) * 0.02) for _ in range(2))
    gain = torch.nn.Parameter(torch.ones(16))
    groups = [
        {"params": [body], "wd_mult": 1.0, "max_lr": proof.LR, "min_lr": proof.MIN_LR},
        {"params": [head], "wd_mult": 1.0, "max_lr": proof.LR, "min_lr": proof.MIN_LR, "adamc": False},
        {"params": [gain], "wd_mult": 0.0, "max_lr": proof.LR, "min_lr": proof.MIN_LR},
    ]
    names = {id(body): "decoder.layers.0.mlp.linear_fc1.weight", id(head): "output_layer.weight", id(gain): "norm.w"}
    optimizer = torch.optim.AdamW(groups, lr=proof.LR, betas=proof.BETAS, eps=proof.EPS, foreach=False)
    sched = scheduler(AdamCParamScheduler if adamc else OptimizerParamScheduler, optimizer)
    captured = []
    for step in range(1, proof.PROOF_STEP + 1):
        for param in (body, head, gain):
            param.grad = torch.randn_like(param) * 0.01
        if step == proof.PROOF_STEP:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    state = optimizer.state[param]
                    captured.append({"name": names[id(param)], "main": param, "wd_mult": group["wd_mult"],
                                     "group_weight_decay": group["weight_decay"],
                                     "before": {"param": param.detach().clone(), "grad": param.grad.clone(),
                                                "exp_avg": state["exp_avg"].clone(),
                                                "exp_avg_sq": state["exp_avg_sq"].clone()}})  # fmt: skip
        optimizer.step()
        sched.step(proof.GBS)
    for shard in captured:
        state = optimizer.state[shard["main"]]
        shard["after"] = {"param": shard["main"].detach().clone(), "exp_avg": state["exp_avg"].clone(),
                          "exp_avg_sq": state["exp_avg_sq"].clone()}  # fmt: skip
    return captured


@pytest.mark.parametrize("adamc", [True, False])
def test_the_reference_matches_the_rule_used_and_misses_the_other(adamc: bool) -> None:
    captured = captured_run(adamc)
    exclude = proof.EXCLUDED if adamc else ()
    used = proof.compare(captured, proof.PROOF_STEP - 1, adamc, exclude, proof.PROOF_STEP)
    assert max(used["max_rel_error"].values()) == 0.0  # torch AdamW both sides: bitwise
    assert used["group_decay_error"] <= 1e-12
    other = proof.compare(captured, proof.PROOF_STEP - 1, not adamc, (), proof.PROOF_STEP)
    assert other["max_rel_error"]["param"] > 10 * proof.MISS  # far beyond the tolerance: the check can fail
    if adamc:
        assert used["plain_decay_params"] == ["output_layer.weight"]
        corrected_too = proof.compare(captured, proof.PROOF_STEP - 1, True, (), proof.PROOF_STEP)
        assert corrected_too["max_rel_error"]["param"] > proof.MISS  # the exclusion is visible in the weights
