"""Process-group set-up: torchrun's environment when present, else a one-rank group (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_adamc.ports import free_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    num_nodes: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_owns_group = False  # this process created the default group (so it also tears it down)


def init_distributed() -> DistEnv:
    global _owns_group
    if "RANK" not in os.environ:  # a plain `megatron-adamc train`: one rank
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        import deepspeed

        if not cuda and int(os.environ["WORLD_SIZE"]) == 1:
            skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend=backend)
        _owns_group = True
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    # Nodes as torchrun numbers them (GROUP_RANK = node rank), counted over all ranks.
    node = int(os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", 0)))
    nodes: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, len(set(nodes)), device, backend)


def close_distributed() -> None:
    """Destroy the process group ``init_distributed`` created (a caller's own group is left alone).

    WHY: a process that exits with its gloo group alive can abort in the interpreter's shutdown (``terminate called
    without an active exception``, SIGABRT, exit 134): 7 of 50 rank exits of a 2-rank gloo loop on torch 2.13, none of
    50 after a destroy. Seen on a preempted Slurm rank that had saved its checkpoint: the requeue became a failure."""
    global _owns_group
    if _owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False


def skip_shm_comm_op() -> None:
    """One CPU rank has nothing to reduce: spare it DeepSpeed's shared-memory all-reduce op, which DeepSpeed's CPU
    backend otherwise JIT-compiles at its first start (~1 min on 2 cores) and checks at every later one."""
    from megatron_adamc.deepspeed.internals import disable_op

    disable_op("deepspeed_shm_comm")


def all_mean(values: list[float], env: DistEnv) -> list[float]:
    """Mean over ranks of a few scalars, in one all-reduce."""
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device if env.backend == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return (tensor / env.world_size).tolist()
