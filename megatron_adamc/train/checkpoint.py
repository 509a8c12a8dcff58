"""Checkpoints through DeepSpeed's own save/load, plus what DeepSpeed does not keep: the data position and each
rank's RNG states. DeepSpeed writes the ``latest`` pointer only after a save completes, so an interrupted save never
takes the place of the last good checkpoint; old tags are pruned only after the new one is complete.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TAG_PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep: int) -> None:
    tag = f"{TAG_PREFIX}{step}"
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:  # prune only after every rank finished the new one
        tags = sorted((p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir()), key=lambda p: int(p.name[5:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(engine: Any, ckpt_dir: Path) -> dict[str, Any] | None:
    """Restores the engine (model, optimizer, lr scheduler) and this rank's RNG; returns the client state."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    rng_file = ckpt_dir / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
