"""What happens to a BatchLoader's workers when their parent ends: run by tests/test_loader.py.

``loader_lifecycle.py reaper CASE``: becomes a child subreaper (so that orphaned workers are re-parented to it and
it can see them exit and reap them), starts ``parent CASE`` in a new session, ends it the CASE's way, then waits up
to ``DEADLINE`` s for every descendant to exit. Prints one JSON line: the parent's exit status, the worker pids
the parent reported, and those still alive at the deadline.

``parent CASE``: builds a loader with 2 workers, takes 2 batches, prints its workers' pids, then waits:
- ``exit``: returns without calling ``close`` (interpreter shutdown must stop the workers, no hang), the loader
  still referenced from a module global (a local one is closed as it goes out of scope);
- ``kill``: SIGKILL to the parent alone;
- ``term-group``: SIGTERM to the whole process group (as Slurm signals a job step) with the default handler: the
  parent dies, the workers (ignoring SIGTERM) must notice and exit;
- ``term-graceful``: SIGTERM to the group, the parent's handler only sets a flag (as the trainer's preemption
  handler): the workers must survive the signal (2 more batches), then ``close`` and exit 0.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

DEADLINE = 30.0
PR_SET_CHILD_SUBREAPER = 36
LOADERS: list = []


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                out += [int(p) for p in handle.read().split()]
        except FileNotFoundError:  # a thread that ended since listdir
            continue
    return out


def parent(case: str) -> None:
    import torch  # here, not at the top: the reaper stays a light process

    from megatron_adamc.data.loader import BatchLoader

    class Tokens:
        """A tiny in-memory dataset with the GPTDataset item layout (workers are forked: nothing is pickled)."""

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            tokens = torch.arange(i, i + 9)
            return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(8)}

    stop = []
    if case == "term-graceful":
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    loader = BatchLoader(Tokens(), micro_batch=2, dp_rank=0, dp_size=1, num_workers=2, prefetch_factor=2)
    LOADERS.append(loader)
    next(loader), next(loader)
    print(json.dumps({"workers": children(os.getpid())}), flush=True)
    if case == "exit":
        return
    deadline = time.monotonic() + DEADLINE
    while not stop and time.monotonic() < deadline:
        time.sleep(0.05)
    if stop:
        tokens, _ = next(loader)
        tokens, _ = next(loader)
        assert tokens[0, 0].item() == 6, tokens  # the 4th micro batch: the workers lived through the signal
        loader.close()
        print(json.dumps({"closed": True}), flush=True)


def reaper(case: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    proc = subprocess.Popen(
        [sys.executable, __file__, "parent", case], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    report = json.loads(proc.stdout.readline())
    if case == "kill":
        proc.kill()
    elif case.startswith("term"):
        os.killpg(proc.pid, signal.SIGTERM)
    started = time.monotonic()
    if case == "term-graceful":
        report["closed"] = "closed" in proc.stdout.readline()  # not read() to EOF: the workers share the pipe
    try:
        report["parent_status"] = proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        report["parent_status"] = "hung"
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers: leave nothing behind
        proc.wait()
    while time.monotonic() - started < DEADLINE and children(os.getpid()):
        try:
            os.waitpid(-1, os.WNOHANG)  # reap the re-parented workers as they exit
        except ChildProcessError:
            break
        time.sleep(0.05)
    report["alive"] = children(os.getpid())
    report["seconds"] = round(time.monotonic() - started, 1)
    for pid in report["alive"]:
        os.kill(pid, signal.SIGKILL)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    {"reaper": reaper, "parent": parent}[sys.argv[1]](sys.argv[2])
