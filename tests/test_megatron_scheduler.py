"""AdamCParamScheduler against megatron-core's own OptimizerParamScheduler (the release installed here).

Part 1 runs 2 gloo ranks (tests/workers/megatron_parity_worker.py) that build a tiny megatron-core GPTModel on the
CPU, take their param groups from megatron-core's ``_get_param_groups`` (a decoupled-lr embedding/output group and
wd_mult 0 norm groups; with ``--adamc-exclude`` the excluded groups) and step AdamC and the stock scheduler side by side
for each decay style, then resume through Megatron's own group matching. Part 2 checks checkpoints in-process: round
trips through torch.save, plain -> AdamC, AdamC -> plain, the resume flags, and what is refused at start-up.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from workers.megatron_parity_worker import (
    CASES,
    COMMON,
    DECOUPLED_LR,
    DECOUPLED_MIN_LR,
    GLOBAL_BATCH,
    LR,
    MIN_LR,
    WD,
    scheduler_args,
)
from workers.megatron_parity_worker import run as parity_rank
from workers.megatron_ranks import run_ranks

from megatron_adamc.core.decay import AdamCError
from megatron_adamc.megatron import ADAMC_STATE_KEY, HISTORY_STATE_KEY, AdamCParamScheduler, PlainParamScheduler

REL_TOL = 1e-12


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("megatron_parity")
    run_ranks(parity_rank, 2, str(out_dir))
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


def test_megatron_builds_the_groups_the_cases_need(parity: list[dict]) -> None:
    meta = parity[0]["meta"]
    assert parity[1]["meta"] == meta
    decayed = {(g["max_lr"], g["wd_mult"]) for g in meta if g["numel"]}
    assert (LR, 1.0) in decayed, "a default-lr decayed group"
    assert (DECOUPLED_LR, 1.0) in decayed, "a decoupled-lr (embedding/output) decayed group"
    assert (LR, 0.0) in decayed, "a wd_mult 0 (norm) group"


@pytest.mark.parametrize("case", list(CASES))
def test_weight_decay_follows_lr_over_peak_and_lr_is_untouched(parity: list[dict], case: str) -> None:
    meta = parity[0]["meta"]
    assert parity[1]["results"][case] == parity[0]["results"][case], "the two ranks disagree"
    smallest_ratio = 1.0
    for iteration, groups in enumerate(parity[0]["results"][case]):
        for index, (lr, wd, plain_lr, plain_wd) in enumerate(groups):
            assert lr == plain_lr, f"{case} iteration {iteration} group {index}: lr differs from the parent's"
            peak = meta[index]["max_lr"]
            expected = plain_wd * plain_lr / peak  # plain_wd is megatron's get_wd(group) * wd_mult
            assert math.isclose(wd, expected, rel_tol=REL_TOL, abs_tol=0.0), (case, iteration, index, wd, expected)
            if meta[index]["wd_mult"] == 0.0:
                assert wd == 0.0
            elif plain_wd > 0:
                smallest_ratio = min(smallest_ratio, wd / plain_wd)
    # The correction is not a no-op: warmup starts at (nearly) zero decay and the tail is far below lambda.
    assert smallest_ratio < 0.05


def test_warmup_and_tail_values_against_the_closed_form(parity: list[dict]) -> None:
    """Independent of megatron's get_lr: linear warmup from 0 and the min_lr tail, for both peaks."""
    meta = parity[0]["meta"]
    steps = parity[0]["results"]["cosine"]
    warmup_iterations = COMMON["lr_warmup_steps"] // GLOBAL_BATCH
    for index, group in enumerate(meta):
        if group["wd_mult"] == 0.0:
            continue
        peak = group["max_lr"]
        floor = MIN_LR if peak == LR else DECOUPLED_MIN_LR
        for iteration in range(warmup_iterations + 1):
            fraction = iteration / warmup_iterations
            assert math.isclose(steps[iteration][index][1], WD * fraction, rel_tol=REL_TOL, abs_tol=1e-300)
        assert math.isclose(steps[-1][index][1], WD * floor / peak, rel_tol=REL_TOL)


def test_excluded_groups_keep_the_plain_decay(parity: list[dict]) -> None:
    excluded = parity[0]["excluded"]
    meta = excluded["meta"]
    flags = {(g["max_lr"], g["wd_mult"], g["adamc"]) for g in meta if g["numel"]}
    # The output layer is in a group of its own (decoupled lr, marked adamc False); the embedding stays corrected.
    assert (DECOUPLED_LR, 1.0, False) in flags and (DECOUPLED_LR, 1.0, True) in flags and (LR, 1.0, True) in flags
    for adamc_step, plain_step in zip(excluded["adamc"], excluded["plain"], strict=True):
        for group, (lr, wd), (plain_lr, plain_wd) in zip(meta, adamc_step, plain_step, strict=True):
            assert lr == plain_lr
            expected = plain_wd if not group["adamc"] else plain_wd * plain_lr / group["max_lr"]
            assert math.isclose(wd, expected, rel_tol=REL_TOL, abs_tol=0.0)


def test_an_exclusion_matching_nothing_is_named(parity: list[dict]) -> None:
    for rank in parity:
        assert rank["typo_error"].startswith("--adamc-exclude outptu_layer matched no parameter")


def test_an_exclusion_counts_when_another_pipeline_stage_matched_it(parity: list[dict]) -> None:
    assert parity[0]["pipeline"]["matched_here"] == [] and parity[1]["pipeline"]["matched_here"] == ["output_layer"]
    # megatron-core aligns the groups over the ranks: the first stage also has the (empty) excluded group.
    for rank in parity:
        assert any(not g["adamc"] for g in rank["pipeline"]["meta"])


def test_resume_through_megatrons_group_matching(parity: list[dict]) -> None:
    """A resume with --lr doubled. megatron-core 0.16.1: the optimizer checkpoint's groups (matched by wd_mult,
    lr_mult, is_expert_parallel, is_decoupled_lr) replace the new ones, max_lr included, so
    --override-opt-param-scheduler moves the scheduler's own max_lr but not the groups': the lr continues the saved
    schedule, and AdamC's peak with it. 0.19 and main match by max_lr and min_lr too: the changed --lr finds no saved
    group and Megatron refuses the load (its own error)."""
    matches_by_peak = "max_lr" in parity[0]["identifier_keys"]
    for mode in ("override", "checkpoint", "override_excluded"):
        run = parity[0]["resumed"][mode]
        if matches_by_peak:
            assert run["error"].startswith("ValueError: Could not find parameter group with key"), run
            continue
        assert run["scheduler_max_lr"] == (2 * LR if mode != "checkpoint" else LR)
        decayed = [i for i, mult in enumerate(run["wd_mult"]) if mult]
        assert [run["max_lr"][i] for i in decayed] == [LR] * len(decayed)  # the new peak (2 LR) never arrives
        assert len(decayed) == (2 if mode == "override_excluded" else 1)
        for step, reference in zip(run["steps"], run["uninterrupted"], strict=True):
            assert step == reference  # exactly the uninterrupted run's lr and decay
            for index in decayed:
                lr, wd = step[index]
                expected = WD if not run["adamc"][index] else WD * lr / LR
                assert math.isclose(wd, expected, rel_tol=REL_TOL)
        assert run["history"] == [["adamc", 0]]


def test_look_alike_groups_load_by_position(parity: list[dict]) -> None:
    # Megatron's own matching gives the excluded group and its look-alike ONE dict (torch's load then fails on the
    # sizes); groups.install_positional_group_matching pairs them by position, and the run resumed exactly.
    run = parity[0]["resumed"]["same_lr_excluded"]
    assert run["megatron_aliases_groups"] is True
    assert run["steps"] == run["uninterrupted"]


def test_exclusion_flags_survive_the_group_swap_of_a_load(parity: list[dict]) -> None:
    run = parity[0]["resumed"]["same_lr_excluded"]
    # A load hands the groups the saved dicts (a look-alike's flag included); the scheduler stamps the flags it read
    # when it was built back before every step.
    assert run["adamc"] == run["built"] and False in run["built"]


# ---------------------------------------------------------------- checkpoints (in-process, no process group)


def torch_groups(model: torch.nn.Module) -> list[dict]:
    """Groups in megatron-core's format: per-group max_lr/min_lr, wd_mult 0 for 1-D tensors, a decoupled head."""
    matrices = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.startswith("2.")]
    vectors = [p for p in model.parameters() if p.ndim == 1]
    return [
        {"params": matrices, "wd_mult": 1.0, "max_lr": LR, "min_lr": MIN_LR},
        {"params": [model[2].weight], "wd_mult": 1.0, "max_lr": DECOUPLED_LR, "min_lr": DECOUPLED_MIN_LR},
        {"params": vectors, "wd_mult": 0.0, "max_lr": LR, "min_lr": MIN_LR},
    ]


def make_optimizer() -> torch.optim.AdamW:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    return torch.optim.AdamW(torch_groups(model), lr=LR, weight_decay=WD)


def make(cls: type[OptimizerParamScheduler], optimizer: torch.optim.Optimizer, **overrides) -> OptimizerParamScheduler:
    return cls(optimizer, **{**scheduler_args("cosine"), **overrides})


def decays(optimizer: torch.optim.Optimizer) -> list[float]:
    return [group["weight_decay"] for group in optimizer.param_groups]


def run(scheduler: OptimizerParamScheduler, iterations: int) -> list[list[float]]:
    trace = []
    for _ in range(iterations):
        scheduler.step(GLOBAL_BATCH)
        trace.append(decays(scheduler.optimizer))
    return trace


def save(path: Path, scheduler: OptimizerParamScheduler) -> None:
    torch.save({"optimizer": scheduler.optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)


def resume(path: Path, cls: type[OptimizerParamScheduler], **overrides) -> OptimizerParamScheduler:
    """Megatron's order: build both, load the optimizer, then the scheduler."""
    checkpoint = torch.load(path)
    optimizer = make_optimizer()
    scheduler = make(cls, optimizer, **overrides)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    return scheduler


def test_state_dict_marks_adamc() -> None:
    assert make(AdamCParamScheduler, make_optimizer()).state_dict()[ADAMC_STATE_KEY] is True
    assert make(PlainParamScheduler, make_optimizer()).state_dict()[ADAMC_STATE_KEY] is False
    assert ADAMC_STATE_KEY not in make(OptimizerParamScheduler, make_optimizer()).state_dict()


def test_resuming_twice_never_compounds(tmp_path: Path) -> None:
    reference = run(make(AdamCParamScheduler, make_optimizer()), 40)
    first = make(AdamCParamScheduler, make_optimizer())
    trace = run(first, 12)
    save(tmp_path / "a.pt", first)
    second = resume(tmp_path / "a.pt", AdamCParamScheduler)
    trace += run(second, 15)
    save(tmp_path / "b.pt", second)
    third = resume(tmp_path / "b.pt", AdamCParamScheduler)
    trace += run(third, 13)
    assert trace == reference
    assert third.num_steps == 40 * GLOBAL_BATCH


def test_plain_checkpoint_into_adamc_is_logged_and_corrected_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain = make(OptimizerParamScheduler, make_optimizer())
    run(plain, 12)
    save(tmp_path / "plain.pt", plain)
    with caplog.at_level(logging.WARNING, logger="megatron_adamc"):
        adamc = resume(tmp_path / "plain.pt", AdamCParamScheduler)
    steps = 12 * GLOBAL_BATCH
    assert any(f"plain (AdamW-decay) OptimizerParamScheduler checkpoint at scheduler step {steps}" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    # Recorded in every later checkpoint: plain from 0, AdamC from this step on.
    assert adamc.state_dict()[HISTORY_STATE_KEY] == [["plain", 0], ["adamc", steps]]
    # Right after the load the groups already hold lambda_t, and the run continues exactly like an AdamC run.
    reference = make(AdamCParamScheduler, make_optimizer())
    run(reference, 12)
    assert decays(adamc.optimizer) == decays(reference.optimizer)
    assert decays(adamc.optimizer) != decays(plain.optimizer)
    assert run(adamc, 20) == run(reference, 20)


def test_adamc_checkpoint_into_plain(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    adamc = make(AdamCParamScheduler, make_optimizer())
    run(adamc, 12)
    save(tmp_path / "adamc.pt", adamc)
    reference = make(OptimizerParamScheduler, make_optimizer())
    run(reference, 12)
    # The stock class ignores the marker; PlainParamScheduler (the plugin without --adamc) also says so.
    stock = resume(tmp_path / "adamc.pt", OptimizerParamScheduler)
    with caplog.at_level(logging.WARNING, logger="megatron_adamc"):
        logged = resume(tmp_path / "adamc.pt", PlainParamScheduler)
    assert any("without --adamc" in r.getMessage() for r in caplog.records)
    for scheduler in (stock, logged):
        assert decays(scheduler.optimizer) == decays(reference.optimizer)  # plain again, from the load on
        assert run(scheduler, 10) == run(make_twin(reference), 10)


def make_twin(scheduler: OptimizerParamScheduler) -> OptimizerParamScheduler:
    twin = make(type(scheduler), make_optimizer())
    twin.step(scheduler.num_steps)
    return twin


def peakless_optimizer() -> torch.optim.AdamW:
    """Groups without their own max_lr, so the scheduler's max_lr (the one a checkpoint can change) is the peak."""
    optimizer = make_optimizer()
    for group in optimizer.param_groups:
        del group["max_lr"], group["min_lr"]
    return optimizer


@pytest.mark.parametrize(
    "flags, peak",
    [
        ({"use_checkpoint_opt_param_scheduler": True, "override_opt_param_scheduler": False}, 2 * LR),
        ({"use_checkpoint_opt_param_scheduler": False, "override_opt_param_scheduler": True}, LR),
    ],
)
def test_resume_flags_keep_their_meaning(flags: dict, peak: float) -> None:
    saved = make(AdamCParamScheduler, peakless_optimizer(), max_lr=2 * LR)
    run(saved, 12)
    adamc = make(AdamCParamScheduler, peakless_optimizer(), **flags)
    stock = make(OptimizerParamScheduler, peakless_optimizer(), **flags)
    adamc.load_state_dict(saved.state_dict())
    stock.load_state_dict(saved.state_dict())
    assert adamc.max_lr == stock.max_lr == peak
    for _ in range(8):
        for a, s in zip(adamc.optimizer.param_groups, stock.optimizer.param_groups, strict=True):
            assert a["lr"] == s["lr"]
            assert math.isclose(a["weight_decay"], s["weight_decay"] * s["lr"] / peak, rel_tol=REL_TOL)
        adamc.step(GLOBAL_BATCH)
        stock.step(GLOBAL_BATCH)


def test_mismatch_without_either_flag_is_refused_like_the_parent() -> None:
    saved = make(AdamCParamScheduler, make_optimizer(), max_lr=2 * LR).state_dict()
    flags = {"use_checkpoint_opt_param_scheduler": False, "override_opt_param_scheduler": False}
    for cls in (OptimizerParamScheduler, AdamCParamScheduler):
        with pytest.raises(AssertionError, match="do not match"):
            make(cls, make_optimizer(), **flags).load_state_dict(saved)


def test_lr_above_a_group_peak_is_refused_with_the_group_named() -> None:
    # init_lr above the decoupled group's own peak would scale its decay above lambda during warmup.
    optimizer = make_optimizer()
    optimizer.param_groups[1]["max_lr"] = 1e-6
    with pytest.raises(AdamCError, match=r"max_lr of param group 1"):
        make(AdamCParamScheduler, optimizer, init_lr=1e-5)


def test_zero_peak_with_decay_is_refused() -> None:
    optimizer = make_optimizer()
    optimizer.param_groups[0]["max_lr"] = 0.0
    with pytest.raises(AdamCError, match=r"max_lr of param group 0 must be a number > 0"):
        make(AdamCParamScheduler, optimizer)


def test_a_peak_exceeded_later_in_the_schedule_is_refused_at_start_up() -> None:
    # decoupled_min_lr above the decoupled peak: the warmup is fine; the lr would pass the peak after it, mid-run.
    optimizer = make_optimizer()
    optimizer.param_groups[1]["min_lr"] = 2 * DECOUPLED_LR
    with pytest.raises(AdamCError, match=r"max_lr of param group 1 is 0.003 but its schedule reaches 0.006 at min_lr"):
        make(AdamCParamScheduler, optimizer)
    # The same group excluded from the correction (plain decay) is no concern of AdamC's.
    optimizer = make_optimizer()
    optimizer.param_groups[1].update(min_lr=2 * DECOUPLED_LR, adamc=False)
    make(AdamCParamScheduler, optimizer)
    # A constant schedule never reaches its min_lr.
    optimizer = make_optimizer()
    optimizer.param_groups[1]["min_lr"] = 2 * DECOUPLED_LR
    make(AdamCParamScheduler, optimizer, lr_decay_style="constant")


def test_a_cuda_graph_captured_optimizer_is_refused() -> None:
    optimizer = make_optimizer()
    for group in optimizer.param_groups:
        group["capturable"] = True  # what --optimizer-cuda-graph makes of TE's FusedAdam (megatron-core 0.18+)
    with pytest.raises(AdamCError, match=r"param group 0 belongs to a CUDA-graph-captured optimizer"):
        make(AdamCParamScheduler, optimizer)
    make(OptimizerParamScheduler, make_optimizer())  # plain AdamW decay is constant: nothing freezes


def test_an_adamc_checkpoint_resumed_plain_is_recorded(tmp_path: Path) -> None:
    adamc = make(AdamCParamScheduler, make_optimizer())
    run(adamc, 5)
    save(tmp_path / "a.pt", adamc)
    plain = resume(tmp_path / "a.pt", PlainParamScheduler)
    run(plain, 5)
    save(tmp_path / "b.pt", plain)
    again = resume(tmp_path / "b.pt", AdamCParamScheduler)
    assert again.state_dict()[HISTORY_STATE_KEY] == [["adamc", 0], ["plain", 20], ["adamc", 40]]
