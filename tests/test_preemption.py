"""PreemptionHandler: ranks agree (one all-reduce) to stop at the same step even when only one got the signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_adamc.train.preemption import REQUEUE_FILE_ENV, PreemptionHandler

REPO = Path(__file__).resolve().parents[1]

# Two real gloo ranks; each writes its step to a file, loops until should_stop(), then reports what it saw.
WORKER = r"""
import json, os, sys, time, datetime
import torch.distributed as dist
from megatron_adamc.train.preemption import PreemptionHandler

rank, world, init, out, self_signal_at = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], int(sys.argv[4])
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
handler = PreemptionHandler().install()
step = 0
while step < 10_000:
    if rank == 1 and step == self_signal_at:
        os.kill(os.getpid(), __import__("signal").SIGUSR1)
    with open(f"{out}/progress.{rank}", "w") as f:
        f.write(str(step))
    time.sleep(0.01 * (rank + 1))  # ranks reach the boundary at different times
    if handler.should_stop():
        break
    step += 1
json.dump({"step": step, "local": handler.local_flag, "signal": getattr(handler.received, "name", None)},
          open(f"{out}/result.{rank}.json", "w"))
dist.destroy_process_group()
"""


def _start_pair(tmp_path: Path, self_signal_at: int) -> list[subprocess.Popen]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init = f"file://{tmp_path / 'store'}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return [
        subprocess.Popen([sys.executable, str(script), str(r), init, str(tmp_path), str(self_signal_at)], env=env)
        for r in range(2)
    ]


def _finish(procs: list[subprocess.Popen], tmp_path: Path) -> list[dict]:
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            assert all(p.poll() in (None, 0) for p in procs), [p.returncode for p in procs]
            time.sleep(0.05)
        assert [p.poll() for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((tmp_path / f"result.{r}.json").read_text()) for r in range(2)]


def test_both_ranks_stop_at_the_same_step_when_one_signals_itself(tmp_path: Path) -> None:
    r0, r1 = _finish(_start_pair(tmp_path, self_signal_at=7), tmp_path)
    assert r1 == {"step": 7, "local": True, "signal": "SIGUSR1"}
    assert r0 == {"step": 7, "local": False, "signal": None}  # rank 0 never saw a signal, yet stopped at 7


def test_external_signal_to_one_rank_stops_both_at_one_step(tmp_path: Path) -> None:
    procs = _start_pair(tmp_path, self_signal_at=-1)
    try:
        progress = tmp_path / "progress.0"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (progress.exists() and progress.read_text() not in ("", "0", "1")):
            time.sleep(0.05)
        os.kill(procs[0].pid, signal.SIGTERM)  # SIGTERM, to rank 0 only
    finally:
        r0, r1 = _finish(procs, tmp_path)
    assert r0["signal"] == "SIGTERM" and r1["signal"] is None
    assert r0["step"] == r1["step"] >= 2


def test_without_distributed_the_local_flag_decides() -> None:
    handler = PreemptionHandler(signals=(signal.SIGUSR2,)).install()
    try:
        assert handler.should_stop() is False
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handler.should_stop() is True
        assert handler.received == signal.SIGUSR2
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_when_training_ends_the_callers_handlers_come_back() -> None:
    """In one process (a notebook, a script training twice): after training, Ctrl-C is the caller's again; after a
    scheduler's stop, that scheduler's signals stay ignored while the process exits."""
    sigs = (signal.SIGINT, signal.SIGUSR2)
    mine = lambda *_: None  # noqa: E731
    before = {sig: signal.signal(sig, mine) for sig in sigs}
    try:
        finished = PreemptionHandler(signals=sigs).install()
        assert signal.getsignal(signal.SIGINT) == finished._on_signal
        finished.restore()  # no signal: everything back
        assert {sig: signal.getsignal(sig) for sig in sigs} == {signal.SIGINT: mine, signal.SIGUSR2: mine}

        stopped = PreemptionHandler(signals=sigs).install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stopped.should_stop()
        stopped.restore()
        assert {sig: signal.getsignal(sig) for sig in sigs} == {signal.SIGINT: mine, signal.SIGUSR2: signal.SIG_IGN}
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_requeue_outside_slurm_does_nothing(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert PreemptionHandler().requeue() is False
    assert "not under Slurm" in capsys.readouterr().err


def test_requeue_with_request_file_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    request = tmp_path / "slurm" / "requeue.42"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv(REQUEUE_FILE_ENV, str(request))
    assert PreemptionHandler().requeue() is True
    assert request.read_text().split()[0] == "42"


def test_requeue_reports_failure_when_scontrol_cannot_requeue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # No scontrol on PATH (as inside a container): requeue must say so and return False. The real-Slurm case
    # (scontrol refusing an unknown job) is in tests/test_slurm.py.
    monkeypatch.setenv("SLURM_JOB_ID", "999999")
    monkeypatch.delenv(REQUEUE_FILE_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert PreemptionHandler().requeue() is False
    assert "scontrol requeue 999999" in capsys.readouterr().err


def test_after_the_stop_is_decided_more_signals_do_not_kill_the_process(tmp_path: Path) -> None:
    # Slurm signals every process of the step and node.sh forwards too: a worker may get SIGUSR1 again while it
    # saves its checkpoint or exits. It must still exit 0 (not "killed by SIGUSR1").
    code = (
        "import os, signal\n"
        "from megatron_adamc.train.preemption import PreemptionHandler\n"
        "h = PreemptionHandler().install()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "assert h.should_stop()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('alive')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stderr


def test_the_trainer_tears_down_only_the_process_group_it_created() -> None:
    """A gloo group still alive at interpreter exit can abort the process (exit 134, seen right after a preempted
    rank saved its checkpoint: the requeue was lost). ``close_distributed`` destroys the group ``init_distributed``
    created and leaves a caller's own group alone."""
    code = (
        "import torch.distributed as dist\n"
        "from megatron_adamc.train.distributed import close_distributed, init_distributed\n"
        "init_distributed(); close_distributed(); print(dist.is_initialized())\n"
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
        "init_distributed(); close_distributed(); print(dist.is_initialized())\n"
    )
    launched = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launched}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["False", "True"]
