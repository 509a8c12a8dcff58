"""A rerun never mixes two runs: a change to what defines the run is refused (run directory untouched), a change that
is legitimate mid-run takes effect and is logged, a rerun on the same ranks continues bitwise (ZeRO 1, 2, 3 with 2
gloo ranks: every logged number, tracking included), and a rerun on another number of ranks continues the same run
(2 -> 1 and 1 -> 2 ranks) with losses equal to an uninterrupted run's within reduction-order noise."""

from __future__ import annotations

import json
import math

import pytest
from trainer_runs import error_lines, losses, run, snapshot, train_cmd

from megatron_adamc.metrics_file import MetricsFile
from megatron_adamc.train.resume import plan_resume

SETS = ["eval.interval=100", "checkpoint.interval=100"]


@pytest.fixture(scope="module")
def paused(tmp_path_factory):
    """A run paused at step 4 of 8."""
    out = tmp_path_factory.mktemp("paused") / "run"
    run(train_cmd(out, *SETS, "train.stop_at_step=4", steps=8))
    return out


@pytest.mark.parametrize(
    ("sets", "changed"),
    [
        (["model.dim=96"], "model.dim 64 -> 96"),
        (["train.seq_len=32", "seed=7"], "seed 1234 -> 7, train.seq_len 64 -> 32"),
        (["train.micro_batch_size=4"], "global_batch 2 -> 4"),
        (["optimizer.type=AdamW"], "optimizer.type 'AdamC' -> 'AdamW'"),
    ],
)  # fmt: skip
def test_changed_run_definition_is_refused(paused, sets, changed) -> None:
    before = snapshot(paused)
    proc = run(train_cmd(paused, *SETS, *sets, steps=8), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "this run directory holds a different run; changed:" in line and changed in line, line
    assert snapshot(paused) == before


def test_legitimate_changes_take_effect_and_are_logged(tmp_path, paused) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(paused, out)
    proc = run(train_cmd(out, *SETS, "optimizer.lr=1.0e-3", "optimizer.weight_decay=0.2", steps=8))
    assert "optimizer.lr 0.003 -> 0.001" in proc.stdout and "optimizer.weight_decay 0.1 -> 0.2" in proc.stdout
    rows = MetricsFile(out).read(strict=True).rows
    # cosine over 8 steps with 2 warmup, peak now 1e-3: the lr and AdamC's decay follow the new values at once
    for row in rows[4:]:
        progress = (row["step"] - 1 - 2 + 1) / 6
        assert row["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-12)
        assert row["weight_decay"] == pytest.approx(0.2 * row["lr"] / 1e-3, rel=1e-9)
    info = json.loads((out / "run.json").read_text())
    assert [i["start_step"] for i in info["invocations"]] == [0, 4]
    assert ["optimizer.lr", 0.003, 0.001] in info["invocations"][1]["changes"]


@pytest.mark.unit
def test_plan_keeps_the_global_batch_across_world_sizes() -> None:
    saved = {"train.micro_batch_size": 2, "train.grad_accum": 1, "global_batch": 8, "model.dim": 64}
    current = {**saved, "global_batch": 4}
    plan = plan_resume(saved, current, saved_world=4, world=2)
    assert plan.grad_accum == 2 and plan.world_size_changed
    assert ("train.grad_accum", 1, 2) in plan.changes
    with pytest.raises(Exception, match=r"cannot be kept on 3 rank\(s\)"):
        plan_resume(saved, {**saved}, saved_world=4, world=3)


TIMING = {"tokens_per_s", "step_time_s", "data_wait_s"}


def _numbers(run_dir) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in MetricsFile(run_dir).read(strict=True).rows]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_same_and_other_world_size(tmp_path, stage) -> None:
    """One uninterrupted 2-rank run against three continuations of it: on 2 ranks (bitwise, every logged number,
    tracking state included), 2 -> 1 ranks and 1 -> 2 ranks (the same samples; reduction order only)."""
    import shutil

    ds = f"train.deepspeed=configs/deepspeed/zero{stage}.json"
    reference, same, down, up = (tmp_path / n for n in ("reference", "same", "down", "up"))
    run(train_cmd(reference, *SETS, ds, nproc=2, steps=10))
    first = run(train_cmd(same, *SETS, ds, "train.stop_at_step=3", nproc=2, steps=10))
    assert "stopping at train.stop_at_step=3" in first.stdout
    shutil.copytree(same, down)
    second = run(train_cmd(same, *SETS, ds, nproc=2, steps=10))
    assert "resumed from" in second.stdout
    # Bitwise: same floats and steps, tracking included: the z-scores of steps 9-10 need the spike window the
    # checkpoint carried over (steps 1-3 are in it).
    assert _numbers(same) == _numbers(reference) and "spike/loss_z" in _numbers(reference)[-1]
    invocations = json.loads((same / "run.json").read_text())["invocations"]
    assert [i["start_step"] for i in invocations] == [0, 3] and invocations[1]["resumed_from"] == "step_3"

    proc = run(train_cmd(down, *SETS, ds, nproc=1, steps=10))  # 2 -> 1: grad_accum 1 -> 2 keeps 4 samples a step
    assert "train.grad_accum 1 -> 2" in proc.stdout and "RNG streams reseeded" in proc.stdout
    run(train_cmd(up, *SETS, ds, "train.grad_accum=2", "train.stop_at_step=3", nproc=1, steps=10))
    proc = run(train_cmd(up, *SETS, ds, "train.grad_accum=2", nproc=2, steps=10))  # 1 -> 2: grad_accum 2 -> 1
    assert "train.grad_accum 2 -> 1" in proc.stdout
    ref = losses(reference)
    for out in (down, up):
        got = losses(out)
        assert [s for s, _ in got] == list(range(1, 11))
        rows = MetricsFile(out).read().rows
        assert [r["tokens"] for r in rows] == [r["tokens"] for r in MetricsFile(reference).read().rows]
        # Same samples in every global step; only the reduction order differs (measured: 4.1e-8 relative).
        worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(got, ref, strict=True))
        print(f"ZeRO-{stage} {out.name}: max relative loss difference {worst:.2e}")
        assert worst < 1e-5
