"""Where a run's numbers go, and the device numbers that join them.

``MetricsLogger`` writes ``metrics.jsonl`` (rows and events, through ``MetricsFile``), TensorBoard, W&B when enabled,
and a progress bar with loss, tokens/s and the ETA; only rank 0 writes, every rank may call. ``DeviceStats`` adds the
model FLOPs utilization and the peak memory of each step on a GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_adamc.metrics_file import LOSS, MFU, PEAK_MEMORY_GB, TOKENS_PER_S, VAL_LOSS, MetricsFile
from megatron_adamc.tracking.sinks import write_tensorboard
from megatron_adamc.train.component import Component, due

# Dense bf16 peak FLOP/s per GPU, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class DeviceStats(Component):
    """MFU (model FLOPs per token x tokens/s over the world's peak) and the step's peak memory, on a GPU."""

    def __init__(self, flops_per_token: float, env: Any) -> None:
        self.flops_per_token = flops_per_token
        self.env = env
        self.peak = peak_flops(env.device)

    def end_step(self, step: int, last: bool, record: dict[str, Any]) -> None:
        if self.peak is not None:
            record[MFU] = self.flops_per_token * record[TOKENS_PER_S] / (self.peak * self.env.world_size)
        if self.env.device.type == "cuda":
            record[PEAK_MEMORY_GB] = torch.cuda.max_memory_allocated(self.env.device) / 1e9
            torch.cuda.reset_peak_memory_stats(self.env.device)


class MetricsLogger(Component):
    def __init__(self, run_dir: Path, config: Any, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.interval = config.logging.interval
        self.file = MetricsFile(run_dir / "metrics.jsonl")
        self.path = self.file.path
        self.writer = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        torn = self.file.truncate(start_step)
        logging = config.logging
        if logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if logging.wandb:
            import wandb

            self.wandb = wandb.init(
                project=logging.wandb_project, dir=str(run_dir), config=config.model_dump(), resume="allow"
            )
        if logging.progress:
            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0,
            )  # fmt: skip
        if torn:
            self.write(f"metrics.jsonl: dropped {torn} torn line(s) left by a crash mid-write")

    def end_step(self, step: int, last: bool, record: dict[str, Any]) -> None:
        """Write the row every ``logging.interval`` steps, at the last and at evaluations; move the bar."""
        if due(step, self.interval, last) or VAL_LOSS in record:
            self.log(record)
        self.progress(step, record[LOSS], record[TOKENS_PER_S])

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.append(record)
        if self.writer is not None:
            write_tensorboard(self.writer, record, record["step"])
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def event(self, kind: str, step: int, message: str | None = None, /, **fields: Any) -> None:
        """An event record in metrics.jsonl, and a line in the log."""
        if not self.enabled:
            return
        self.file.append_event(kind, step, **fields)
        self.write(message or f"{kind} at step {step}: {json.dumps(fields)}")

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(step - self.bar.n)  # redraws at most every mininterval (10 s in a log file)

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
