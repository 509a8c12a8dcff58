"""AdamCParamScheduler against megatron-core's own OptimizerParamScheduler (the release installed here).

Part 1 runs 2 gloo ranks (torch.multiprocessing spawn) that build a tiny megatron-core GPTModel on the CPU, take
their param groups from megatron-core's ``_get_param_groups`` (a decoupled-lr embedding/output group and wd_mult 0
norm groups) and step AdamC and the stock scheduler side by side for each decay style. Part 2 checks checkpoints
in-process: round trips through torch.save, plain -> AdamC, AdamC -> plain, and the resume flags.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_adamc.core.decay import AdamCError
from megatron_adamc.megatron import ADAMC_STATE_KEY, AdamCParamScheduler, PlainParamScheduler

LR, MIN_LR, DECOUPLED_LR, DECOUPLED_MIN_LR, WD = 1e-3, 1e-5, 3e-3, 3e-5, 0.1
GLOBAL_BATCH = 4  # Megatron counts scheduler steps in samples: one iteration = increment of the global batch
ITERATIONS = 50  # 200 samples: past lr_decay_steps, so the min_lr tail is covered too
REL_TOL = 1e-12

# Scheduler arguments per case, in samples. Every case warms up; one also ramps lambda itself (weight_decay_incr).
COMMON = dict(init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=20, lr_decay_steps=160)
CASES: dict[str, dict] = {
    "cosine": dict(COMMON, lr_decay_style="cosine"),
    "linear": dict(COMMON, lr_decay_style="linear"),
    "WSD": dict(COMMON, lr_decay_style="WSD", wsd_decay_steps=60, lr_wsd_decay_style="cosine"),
    "WSD-minus-sqrt": dict(COMMON, lr_decay_style="WSD", wsd_decay_steps=60, lr_wsd_decay_style="minus_sqrt"),
    "inverse-square-root": dict(COMMON, lr_decay_style="inverse-square-root"),
    "cosine-init-lr": dict(COMMON, init_lr=1e-5, lr_decay_style="cosine"),
    "cosine-wd-incr-linear": dict(
        COMMON, lr_decay_style="cosine", start_wd=0.02, end_wd=WD, wd_incr_steps=120, wd_incr_style="linear"
    ),
}


def scheduler_args(case: str) -> dict:
    args = {"start_wd": WD, "end_wd": WD, "wd_incr_steps": ITERATIONS * GLOBAL_BATCH, "wd_incr_style": "constant"}
    args.update(CASES[case])
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def megatron_param_groups() -> list[dict]:
    """megatron-core's own groups for a tiny GPTModel built on the CPU (needs model parallel initialized)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups, get_standard_config_overrides
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        normalization="RMSNorm",
        add_bias_linear=False,
        use_cpu_initialization=True,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=64,
        max_sequence_length=16,
        share_embeddings_and_output_weights=False,
    )
    optimizer_config = OptimizerConfig(
        lr=LR, min_lr=MIN_LR, weight_decay=WD, decoupled_lr=DECOUPLED_LR, decoupled_min_lr=DECOUPLED_MIN_LR
    )
    # The overrides Megatron-LM's training passes: wd_mult 0 for biases and 1-D tensors, decoupled embedding/output lr.
    return _get_param_groups([model], optimizer_config, get_standard_config_overrides(optimizer_config))


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    # What megatron-core builds when neither TE nor apex is installed; each optimizer gets its own group dicts.
    return torch.optim.AdamW([dict(group) for group in groups], lr=LR, weight_decay=WD)


def parity_worker(rank: int, port: int, out_dir: str) -> None:
    """Steps AdamC and the stock scheduler on twin optimizers; saves every step's lr and weight decay per group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    groups = megatron_param_groups()
    results = {}
    for case in CASES:
        adamc_opt, plain_opt = adamw(groups), adamw(groups)
        adamc = AdamCParamScheduler(adamc_opt, **scheduler_args(case))
        plain = OptimizerParamScheduler(plain_opt, **scheduler_args(case))
        steps = []
        for iteration in range(ITERATIONS + 1):
            if iteration:  # iteration 0 records what the constructors' step(0) wrote
                adamc.step(GLOBAL_BATCH)
                plain.step(GLOBAL_BATCH)
            steps.append(
                [
                    (a["lr"], p["lr"], a["weight_decay"], p["weight_decay"])
                    for a, p in zip(adamc_opt.param_groups, plain_opt.param_groups, strict=True)
                ]
            )
        results[case] = steps
    meta = [
        {"max_lr": g["max_lr"], "wd_mult": g["wd_mult"], "numel": sum(p.numel() for p in g["params"])} for g in groups
    ]
    torch.save({"meta": meta, "results": results}, f"{out_dir}/rank{rank}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("megatron_parity")
    mp.spawn(parity_worker, args=(free_port(), str(out_dir)), nprocs=2, join=True)
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
        for index, (lr, plain_lr, wd, plain_wd) in enumerate(groups):
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
            assert math.isclose(steps[iteration][index][2], WD * fraction, rel_tol=REL_TOL, abs_tol=1e-300)
        assert math.isclose(steps[-1][index][2], WD * floor / peak, rel_tol=REL_TOL)


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
    assert any("plain OptimizerParamScheduler checkpoint" in r.getMessage() for r in caplog.records)
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
