"""A stand-in for `megatron-adamc train` with the same command line and output files, for the Slurm tests.

WHY: the Slurm mechanics (two nodes, rendezvous, signals through srun and torchrun, checkpoint, requeue,
resume) must be proven without waiting for a real model. This is a real torch.distributed gloo job: it
all-reduces, records world size and the Slurm nodes it ran on, "trains" one scalar per step (a deterministic
loss curve), checkpoints it, resumes from the checkpoint exactly, and uses the real PreemptionHandler.

    --config FILE --output-dir DIR [--set train.steps=N] [--set checkpoint.interval=K]
    environment: STANDIN_STEP_SECONDS=S, STANDIN_CRASH_RANK=R with STANDIN_CRASH_AT=STEP (crash once)

Its own knobs come from the environment, not --set, so its config stays one that `slurm submit` validates.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_adamc.train.preemption import PreemptionHandler


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    return args, dict(kv.split("=", 1) for kv in args.set)


def main(argv: list[str]) -> int:
    args, sets = parse(argv)
    if not Path(args.config).is_file():
        print(f"--config {args.config}: no such file", file=sys.stderr)
        return 2
    steps = int(sets.get("train.steps", "20"))
    save_interval = int(sets.get("checkpoint.interval", "5"))
    step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.2"))
    crash_rank = int(os.environ.get("STANDIN_CRASH_RANK", "-1"))
    crash_at = int(os.environ.get("STANDIN_CRASH_AT", "-1"))

    handler = PreemptionHandler().install()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"

    # The all-reduce proves the ranks really talk; the node names prove they ran on different Slurm nodes.
    ranks_sum = torch.tensor([float(rank)])
    dist.all_reduce(ranks_sum)
    assert ranks_sum.item() == world * (world - 1) / 2
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME", socket.gethostname()))

    w, start = torch.tensor([0.0], dtype=torch.float64), 0
    latest = ckpt_dir / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        state = torch.load(ckpt_dir / tag / "state.pt")
        w, start = state["w"], state["step"]

    def save(step: int) -> None:
        if rank == 0:
            (ckpt_dir / f"step{step}").mkdir(parents=True, exist_ok=True)
            torch.save({"w": w, "step": step}, ckpt_dir / f"step{step}" / "state.pt")
            (ckpt_dir / "latest").write_text(f"step{step}")
        dist.barrier()

    metrics = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        kept = [
            ln
            for ln in (metrics.read_text().splitlines() if metrics.exists() else [])
            if json.loads(ln)["step"] < start
        ]
        metrics.write_text("".join(ln + "\n" for ln in kept))
        run = {
            "world_size": world,
            "num_nodes": len(set(nodes)),
            "nodes": sorted(set(nodes)),
            "resumed_from_step": start if start else None,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "master_addr": os.environ.get("MASTER_ADDR"),
        }
        (out / "run.json").write_text(json.dumps(run))
        with (out / "runs.jsonl").open("a") as f:  # one line per (re)start, for the tests
            f.write(json.dumps(run) + "\n")

    for step in range(start, steps):
        if handler.should_stop():
            save(step)
            if rank == 0:
                handler.requeue()
            dist.destroy_process_group()  # as the trainer does: a live gloo group can abort the exit (134)
            return 0
        if rank == crash_rank and step == crash_at and not (out / "crashed-once").exists():
            (out / "crashed-once").write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)  # a rank dies without warning (a lost node, the OOM killer)
        # One "training step": every rank holds a shard of the target; the gradient is all-reduced.
        target = torch.tensor([3.0 + rank], dtype=torch.float64)
        grad = 2 * (w - target)
        loss = (w - target) ** 2
        dist.all_reduce(grad)
        dist.all_reduce(loss)
        w = w - 0.05 * grad / world
        if rank == 0:
            with metrics.open("a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item() / world, "world_size": world}) + "\n")
        time.sleep(step_seconds)
        if (step + 1) % save_interval == 0:
            save(step + 1)
    save(steps)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
