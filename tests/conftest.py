"""Shared fixtures: launching multi-rank workers under torchrun, and a one-rank gloo group for in-process engines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
# A small corpus and model for end-to-end trainer tests (trainer, Slurm): one cache, built once, shared by all of them.
SMALL_CORPUS_DIR = Path(tempfile.gettempdir()) / "megatron-adamc-test-corpus"
SMALL_TRAIN_SETS = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
    "train.seq_len=64", "train.micro_batch_size=2", "scheduler.warmup_steps=2", "eval.batches=2",
    "checkpoint.interval=100", "tracking.interval=4", "logging.tensorboard=false", "logging.progress=false",
    "data.vocab_size=512", "data.max_bytes=400000", f"data.cache_dir={SMALL_CORPUS_DIR}",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment without the process-group variables ``single_rank_dist`` set for itself, so a
    child starts its own group (a leaked MASTER_PORT is a port this process already listens on)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def torchrun(script: Path, args: list[str], nproc: int = 2, timeout: int = 600, log: Path | None = None) -> str:
    """Runs ``script`` on ``nproc`` local gloo ranks; returns the combined output, fails the test on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=REPO)
    output = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(output)
    if proc.returncode != 0:
        pytest.fail(f"{script.name} {' '.join(args)} exited {proc.returncode}:\n{output[-6000:]}")
    return output


@pytest.fixture(autouse=True, scope="module")
def _pristine_torch_linear():
    """An in-process ZeRO-3 engine replaces ``torch.nn.functional.linear`` with DeepSpeed's memory-efficient linear
    for the life of the process ("This will persist unless manually reset"): put it back after each module, so no
    later test (activation memory, selective checkpointing) measures DeepSpeed's linear instead of torch's."""
    import torch

    original = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = original


@pytest.fixture(scope="module")
def single_rank_dist():
    """A one-rank gloo process group in the pytest process, for engines built in-process. DeepSpeed's engine reads
    the env vars for as long as the module's tests run; afterwards they are restored and the group destroyed, so no
    later test's child process inherits a MASTER_PORT this process listens on."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    os.environ.update(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    yield
    if dist.is_initialized():
        # DeepSpeed's own call: it also drops the groups DeepSpeed cached (its world and data-parallel groups), which
        # would otherwise point the next module's engines at this destroyed group ("Group ... is not registered").
        deepspeed.comm.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# Every process a test starts (trainers, torchrun ranks, loader workers, Slurm jobs and daemons) inherits this mark,
# so that whatever a failed or timed-out test left running is found at the end, even when orphaned, and killed:
# the suite never leaves a process behind to hold a runner up.
SESSION_MARK = "MEGATRON_ADAMC_TEST_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}-{os.urandom(4).hex()}"


def _marked_processes() -> dict[int, str]:
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if mark not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmd = handle.read().replace(b"\0", b" ").decode(errors="replace")[:160]
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # gone meanwhile, or not ours to read
            continue
        # pytest's own multiprocessing helpers (the in-process experiments start a fork server): they end with it.
        own_fork_server = "multiprocessing.forkserver" in cmd and parent == os.getpid()
        if "multiprocessing.resource_tracker" not in cmd and not own_fork_server:
            found[int(entry)] = cmd
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    from megatron_adamc.train.jit_locks import clear_stale_locks, use_interpreter_ninja

    use_interpreter_ninja()  # every process below builds and checks DeepSpeed's ops with the venv's ninja
    clear_stale_locks()  # a build lock a killed process left would hang every DeepSpeed op load below


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import signal

    runs = sys.modules.get("trainer_runs")
    if runs is not None:  # the trainer runs' fork server ends with the session, not as a leftover
        runs.close_fork_server()
    if getattr(session.config.option, "numprocesses", None) and not hasattr(session.config, "workerinput"):
        return  # the xdist controller: each worker cleans up after its own tests (the workers carry this mark)

    leftovers = _marked_processes()
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if leftovers:
        lines = "\n".join(f"  {pid}: {cmd}" for pid, cmd in sorted(leftovers.items()))
        print(f"\nkilled {len(leftovers)} process(es) the tests left running:\n{lines}", file=sys.stderr)
