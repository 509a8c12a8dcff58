"""Real gloo ranks for the Megatron tests, forked from the experiments' fork server (torch, DeepSpeed and megatron-core
imported once: a rank starts at its first line of work instead of ~10 s of imports).

``run_ranks(target, world, *args)`` runs ``target(rank, world, *args)`` in ``world`` processes that share a fresh
gloo process group (``MASTER_PORT`` free), and raises with the failing rank's traceback if any rank fails.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

from megatron_adamc.experiments._launcher import PRELOAD


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(target: Callable, rank: int, world: int, port: int, errors: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        target(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        Path(errors, f"rank{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)


def run_ranks(target: Callable, world: int, *args: Any, timeout: float = 300) -> None:
    forkserver.set_forkserver_preload([PRELOAD])  # the same preload as the experiments' (one server per session)
    ctx = multiprocessing.get_context("forkserver")
    port = free_port()
    with tempfile.TemporaryDirectory() as errors:
        procs = [
            ctx.Process(target=_rank_main, args=(target, rank, world, port, errors, args)) for rank in range(world)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        reports = sorted(Path(errors).glob("rank*.txt"))
        codes = [proc.exitcode for proc in procs]
        if reports or any(codes):
            detail = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in reports)
            raise RuntimeError(f"ranks exited {codes}\n{detail}")
