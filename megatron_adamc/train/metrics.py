"""Where a run's numbers go: ``metrics.jsonl`` (rows and events, through ``MetricsFile``), TensorBoard, W&B when
enabled, and a progress bar with loss, tokens/s and the ETA. Only rank 0 writes; every rank may call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_adamc.metrics_file import MetricsFile
from megatron_adamc.tracking.sinks import write_tensorboard


class MetricsLogger:
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

    def should_log(self, step: int, last_step: bool) -> bool:
        return last_step or step % self.interval == 0

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
