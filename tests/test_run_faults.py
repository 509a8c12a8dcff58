"""Run-level faults with real processes: two trainers on one directory, a stale lock, a forced divergence, Ctrl-C
(once: checkpoint and exit; twice: abort at once), and a DeepSpeed JSON with a mistyped top-level key."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from cli_runs import cli
from conftest import REPO, subprocess_env
from trainer_runs import error_lines, losses, run, snapshot, train_cmd

from megatron_adamc.metrics_file import MetricsFile

SETS = ["checkpoint.interval=2", "eval.interval=100"]


@contextlib.contextmanager
def _started(cmd: list[str]) -> Iterator[subprocess.Popen]:
    """A trainer in its own session; whatever the test's outcome, nothing of it outlives the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=subprocess_env(), start_new_session=True)  # fmt: skip
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers
        proc.communicate()


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = MetricsFile(out).last_row()
        if row is not None and row["step"] >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_second_trainer_refuses_and_a_dead_ones_lock_is_taken_over(tmp_path) -> None:
    out = tmp_path / "run"
    with _started(train_cmd(out, *SETS, steps=10_000)) as first:
        _wait_for_step(out, 1, first)
        second = run(train_cmd(out, *SETS, steps=10_000), check=False)
        assert second.returncode == 5, second.stderr[-3000:]
        (line,) = error_lines(second)
        assert "is in use by a running trainer" in line and f"pid {first.pid}" in line
        assert first.poll() is None  # the first one trains on, undisturbed
    third = run(train_cmd(out, *SETS, steps=3))  # the killed holder's lock is taken over
    assert "took over the lock of a trainer that is gone" in third.stdout and f"pid {first.pid}" in third.stdout


def test_forced_divergence_stops_with_exit_3_and_no_bad_checkpoint(tmp_path) -> None:
    out = tmp_path / "run"
    # train.max_weight_growth off: this test is the bad-step streak (with it on, the save of step 1's ~5e29 weights is
    # refused at once: tests/test_user_errors_runs.py)
    sets = [*SETS, "optimizer.lr=1.0e30", "checkpoint.interval=1", "train.max_weight_growth=null"]
    proc = run(train_cmd(out, *sets, steps=20), check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "diverged: 3 bad steps in a row up to step" in line and "last good checkpoint" in line
    metrics = MetricsFile(out).read(strict=True)
    skipped = [e for e in metrics.events if e["event"] == "skipped_step"]
    assert len(skipped) >= 3 and skipped[-1]["reason"] in ("nonfinite_loss", "nonfinite_grad")
    last = metrics.rows[-1]
    assert last["skipped_steps"] == len(skipped) and last["step"] == skipped[-1]["step"] < 20
    # Every published checkpoint loads and holds finite values only.
    import torch

    for tag_dir in (out / "checkpoints").glob("step_*"):
        for file in tag_dir.glob("*optim_states.pt"):
            state = torch.load(file, weights_only=False)["optimizer_state_dict"]
            flat = state["single_partition_of_fp32_groups"]
            assert all(torch.isfinite(t).all() for t in flat), tag_dir


def test_ctrl_c_checkpoints_and_resumes_exactly(tmp_path) -> None:
    reference = tmp_path / "reference"
    sets = [*SETS, "checkpoint.interval=1000", "tracking.enabled=false"]
    run(train_cmd(reference, *sets, steps=150))
    out = tmp_path / "run"
    with _started(train_cmd(out, *sets, steps=150)) as proc:
        _wait_for_step(out, 3, proc)
        os.kill(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "interrupted (Ctrl-C); checkpoint saved" in stdout and "Traceback" not in stderr
    stopped_at = losses(out)[-1][0]
    assert stopped_at < 150
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped_at}"
    run(train_cmd(out, *sets, steps=150))
    assert losses(out) == losses(reference)


def test_second_ctrl_c_aborts_at_once(tmp_path) -> None:
    out = tmp_path / "run"
    with _started(train_cmd(out, *SETS, steps=10_000)) as proc:
        _wait_for_step(out, 1, proc)
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.03)  # the second lands mid-step or mid-save (a save alone takes longer than this)
        os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "megatron-adamc train: interrupted" in stderr and "Traceback" not in stderr


def test_preemption_handler_second_interrupt_raises() -> None:
    from megatron_adamc.train.preemption import PreemptionHandler

    handler = PreemptionHandler().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert handler.interrupted and handler.local_flag  # the first: a flag for the next step boundary
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            raise AssertionError("the second SIGINT did not abort")
        except KeyboardInterrupt:
            pass
    finally:
        for sig in handler.signals:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def test_mistyped_deepspeed_key_is_refused(tmp_path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    out = tmp_path / "run"
    out.mkdir()
    before = snapshot(out)
    cmd = train_cmd(out, f"train.deepspeed={ds}", steps=4)
    proc = cli(*cmd[cmd.index("train") :])  # refused before any process group: in this process
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "unknown top-level key 'zero_optimisation' (did you mean 'zero_optimization'?)" in line
    assert snapshot(out) == before
