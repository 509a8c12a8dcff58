"""User errors and faults that need real trainer processes (issue 22): a kill -9 of the trainer (its loader workers end
with it), a kill during the very first save (the rerun starts afresh), exit codes through the multi-rank launcher,
divergence as documented (stop_at_step on a bad step, weights that blew up are never named as the checkpoint to
resume from), a tokenizer swapped under a resumed run, and Ctrl-C while the command starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL_CORPUS_DIR, WORKERS, subprocess_env
from trainer_runs import error_lines, losses, run, snapshot, train_cmd
from user_errors import ensure_small_corpus

from megatron_adamc.cli.launch import exit_code
from megatron_adamc.data import train_tokenizer
from megatron_adamc.metrics_file import MetricsFile


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- family 6: processes ------------------------------------------------------------------------------------------


def test_loader_workers_end_with_a_killed_trainer(tmp_path):
    """kill -9 of the trainer (what the OOM killer or a timeout does): its loader workers, which ignore SIGTERM,
    are gone within 2 s (DataLoader's own watchdog alone took 5 s here; one blocked worker was seen live minutes)."""
    out = tmp_path / "run"
    cmd = train_cmd(out, "data.num_workers=2", "checkpoint.interval=1000", steps=100_000)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=subprocess_env(), start_new_session=True)  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while MetricsFile(out).last_row() is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        while any(_alive(w) for w in workers) and time.monotonic() - killed < 2.0:
            time.sleep(0.02)
        assert not any(_alive(w) for w in workers), f"workers outlived the trainer by 2 s: {workers}"
    finally:
        for pid in [proc.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()


# -- family 7: a kill during the very first save -------------------------------------------------------------------

SETS = ["checkpoint.interval=2", "eval.interval=100", "tracking.interval=2"]


def test_kill_during_the_first_save_starts_afresh(tmp_path):
    out = tmp_path / "run"
    head = [str(WORKERS / "kill_during_save.py"), "after_deepspeed", "1"]
    killed = run(train_cmd(out, *SETS, steps=4, head=head), check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "checkpoints" / "step_2").is_dir() and not (out / "checkpoints" / "latest").exists()
    first_attempt = losses(out)
    rerun = run(train_cmd(out, *SETS, steps=4))  # what a requeued job does: it must not fail forever
    text = rerun.stdout + rerun.stderr
    assert (
        "is a save that never completed (no manifest.json), not a checkpoint: set aside as step_2.incomplete-" in text
    )
    assert "no checkpoint to resume, so the run starts at step 1; metrics.jsonl held 2 rows up to step 2" in text
    (aside,) = out.glob("metrics.set-aside-*.jsonl")
    assert [(r["step"], r["loss"]) for r in MetricsFile(aside).read(strict=True).rows] == first_attempt
    assert losses(out)[:2] == first_attempt and [s for s, _ in losses(out)] == [1, 2, 3, 4]  # bitwise, once each
    assert (out / "checkpoints" / "latest").read_text() == "step_4"
    assert len(list((out / "checkpoints").glob("step_2.incomplete-*"))) == 1
    invocations = json.loads((out / "run.json").read_text())["invocations"]
    assert [i["resumed_from"] for i in invocations] == [None, None]


# -- family 9 (and 4, 8): divergence as documented, one run directory ---------------------------------------------


@pytest.fixture(scope="module")
def paused(tmp_path_factory) -> dict[str, Path]:
    """A run on custom data (its tokenizer a private copy) paused at step 2 with a good checkpoint."""
    ensure_small_corpus()
    d = tmp_path_factory.mktemp("paused")
    tokenizer = d / "tokenizer.model"
    shutil.copyfile(SMALL_CORPUS_DIR / "tokenizer.model", tokenizer)
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):  # data made elsewhere: no tokenizer record
        shutil.copyfile(SMALL_CORPUS_DIR / name, d / name)
    sets = [*SETS, "data.default_corpus=false", f"data.train={d / 'train'}", f"data.valid={d / 'valid'}",
            f"data.tokenizer={tokenizer}"]  # fmt: skip
    out = d / "run"
    run(train_cmd(out, *sets, "train.stop_at_step=2", steps=4))
    assert (out / "checkpoints" / "latest").read_text() == "step_2"
    return {"dir": d, "out": out, "tokenizer": tokenizer, "sets": sets}  # type: ignore[dict-item]


def test_weights_that_blew_up_are_never_named_usable(paused, tmp_path):
    """The issue's case: an lr blow-up whose step still has a finite loss (weights ~5e29) used to be saved and then
    named as the last good checkpoint. Its save is refused; the checkpoint named is the one before, and resuming
    from it with a sane lr, as the line advises, continues."""
    out = tmp_path / "run"
    shutil.copytree(paused["out"], out)
    blown = run(train_cmd(out, *paused["sets"], "optimizer.lr=1.0e30", "checkpoint.interval=1", steps=4), check=False)
    assert blown.returncode == 3, blown.stderr[-3000:]
    (line,) = error_lines(blown)
    good = out / "checkpoints" / "step_2"
    assert "step 3: the weights' norm" in line and "the weights blew up, so no checkpoint was written" in line, line
    assert line.endswith(f"last good checkpoint: {good}. Lower optimizer.lr and resume from it"), line
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_2"]
    assert 1 < torch.load(good / "trainer_state.pt", weights_only=False)["weight_norm"] < 1e3
    resumed = run(train_cmd(out, *paused["sets"], steps=4))
    assert f"resumed from {good} at step 2" in resumed.stdout
    assert all(abs(loss) < 20 for _, loss in losses(out))


def test_stop_at_step_on_a_bad_step_is_exit_3_without_a_checkpoint(paused, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(paused["out"], out)
    sets = [*paused["sets"], "optimizer.lr=1.0e30", "train.max_weight_growth=null", "train.stop_at_step=4"]
    proc = run(train_cmd(out, *sets, steps=6), check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    good = out / "checkpoints" / "step_2"
    assert f"stopping at train.stop_at_step=4; no checkpoint of it (last good: {good})" in proc.stdout
    (line,) = error_lines(proc)
    assert "the run ended on 1 non-finite/skipped step(s) at step 4" in line and f"last good checkpoint: {good}" in line
    assert "checkpoint saved" not in proc.stdout and not (out / "checkpoints" / "step_4").exists()


def test_a_tokenizer_swapped_under_a_resumed_run_is_one_line(paused, tmp_path):
    """The same path, another file: the model's vocabulary would no longer match its checkpoint (a traceback in
    DeepSpeed's load before). One line, exit 2, the run directory byte-identical; through the 2-rank launcher."""
    out, tokenizer = paused["out"], paused["tokenizer"]
    original = tokenizer.read_bytes()
    docs = (SMALL_CORPUS_DIR / "train.jsonl").read_text().splitlines()[:200]
    train_tokenizer((json.loads(line)["text"] for line in docs), str(tmp_path / "other"), 600)
    before = snapshot(out)
    cmd = [sys.executable, "-m", "megatron_adamc.cli", "train", "--nproc-per-node", "2"]
    cmd += train_cmd(out, *paused["sets"], "train.micro_batch_size=1", steps=4)[4:]  # --config ... --set ...
    try:
        shutil.copyfile(tmp_path / "other.model", tokenizer)
        proc = run(cmd, check=False)
    finally:
        tokenizer.write_bytes(original)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "the tokenizer changed under this run: step_2 was trained with" in lines[0], lines[0]
    assert f"now {tokenizer} has 600 pieces" in lines[0]
    assert snapshot(out) == before


# -- family 8: the launcher's exit codes (unit) -------------------------------------------------------------------


class _Failure:
    def __init__(self, exitcode: int, timestamp: int) -> None:
        self.exitcode, self.timestamp = exitcode, timestamp


def test_launcher_reports_the_contract_code_of_the_first_failed_rank():
    # rank 1 failed first with 3; rank 0 was then ended by the agent (SIGTERM): 3
    assert exit_code({0: _Failure(-15, 11), 1: _Failure(3, 10)})[:2] == (3, 1)
    # rank 1 crashed (1) at the same second as rank 0 refused its input (2): the contract code wins
    assert exit_code({0: _Failure(2, 10), 1: _Failure(1, 10)})[:2] == (2, 0)
    # only signals: 128 + the signal, as a shell reports a killed process
    assert exit_code({1: _Failure(-9, 10), 0: _Failure(-15, 12)})[:2] == (137, 1)


# -- family 10: Ctrl-C while the command starts ----------------------------------------------------------------------


def _loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("after", [0.0, 1.5])
def test_ctrl_c_while_starting_is_one_line(tmp_path, after):
    """Ctrl-C once torch's library is being loaded (Python's own start-up, before any project code, is Python's),
    and ``after`` seconds later: one line, exit 130, no traceback, nothing created."""
    cmd = train_cmd(tmp_path / "run", steps=4)
    # A terminal's foreground job: SIGINT at its default. A test process started as a background job of a
    # non-interactive shell has SIGINT ignored, and the child would inherit that for the moments between the import
    # guard and the trainer's own handler (the run then trained on and exited 0).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=subprocess_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 60
    while not _loaded(proc.pid, "libtorch_cpu") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].endswith(": interrupted"), stderr[-3000:]
    assert not (tmp_path / "run").exists()
