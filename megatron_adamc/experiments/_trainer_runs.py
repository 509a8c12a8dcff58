"""What the LLM experiments share: each run is one ``megatron-adamc train`` subprocess, read back from metrics.jsonl.

A subprocess per run keeps runs isolated (DeepSpeed's global state, RNG, memory) and makes every run a command a user
can repeat by hand: its exact ``--set`` list is saved beside its metrics. A finished run whose overrides match is
reused, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from megatron_adamc.errors import DivergenceError, UserError
from megatron_adamc.metrics_file import MetricsFile
from megatron_adamc.resources import configs_dir, find_file

# Model shapes by name. "micro" is what the CPU defaults train in seconds per hundred steps; the others scale up.
MODELS: dict[str, dict[str, Any]] = {
    "micro": dict(preset="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=192),
    "tiny": dict(preset="tiny"),
    "125M": dict(preset="125M"),
    "350M": dict(preset="350M"),
    "1B": dict(preset="1B"),
}
ModelName = Literal["micro", "tiny", "125M", "350M", "1B"]
DIVERGED_FILE = "diverged.json"  # beside a run's metrics: the trainer stopped it as diverged (exit 3), and where


class LlmConfig(BaseModel):
    """Model, data and launch fields common to the LLM experiments (each experiment adds its own)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelName = Field("micro", description="micro: d=64, 2 layers (CPU); tiny/125M/350M/1B: trainer presets")
    seq_len: int = Field(64, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    vocab_size: int = Field(1024, gt=0, description="the default corpus' BPE vocabulary")
    max_bytes: int = Field(8_000_000, gt=0, description="bytes of Python stdlib source in the corpus")
    data_cache_dir: str | None = Field(
        None, description="default: ~/.cache/megatron-adamc/experiments-v<vocab_size>, apart from the trainer's cache"
    )
    base_config: str | None = Field(None, description="trainer YAML the overrides apply to; default llama_tiny.yaml")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON, e.g. configs/deepspeed/zero1_bf16.json on a GPU")
    extra: list[str] = Field(default_factory=list, description="raw trainer overrides appended to every run")


def base_config_path(cfg: LlmConfig) -> Path:
    path = find_file(cfg.base_config) if cfg.base_config else configs_dir() / "train" / "llama_tiny.yaml"
    if not path.is_file():
        raise UserError(f"base_config={path}: no such file; pass --set base_config=PATH to a trainer YAML")
    return path


def common_overrides(cfg: LlmConfig) -> list[str]:
    """The trainer ``--set`` list every run of an experiment shares: model, data, and no per-run overhead."""
    cache = cfg.data_cache_dir or f"~/.cache/megatron-adamc/experiments-v{cfg.vocab_size}"
    sets = [f"model.{k}={v}" for k, v in MODELS[cfg.model].items()]
    sets += [
        f"model.max_seq_len={cfg.seq_len}",
        f"train.seq_len={cfg.seq_len}",
        f"train.micro_batch_size={cfg.micro_batch_size}",
        "train.grad_accum=1",
        f"data.vocab_size={cfg.vocab_size}",
        f"data.max_bytes={cfg.max_bytes}",
        f"data.cache_dir={cache}",
        "checkpoint.interval=1000000",  # only the final save; runs are short
        "checkpoint.keep=1",
        "logging.tensorboard=false",
        "logging.progress=false",  # the experiment prints its own progress, across runs
    ]
    if cfg.deepspeed:
        sets.append(f"train.deepspeed={cfg.deepspeed}")
    return sets


def load_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows sorted by step; a half-written last line (run still going) is skipped."""
    return MetricsFile(path).read().rows


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunQueue:
    """Runs trainer subprocesses one at a time and prints which run, its step, and the ETA of run and experiment."""

    def __init__(self, cfg: LlmConfig, output_dir: Path, total_steps: int, print_every_s: float = 15.0) -> None:
        self.base = base_config_path(cfg)
        self.common = common_overrides(cfg) + list(cfg.extra)
        self.runs_dir = output_dir / "runs"
        self.total_steps = total_steps  # over all runs, for the experiment's ETA
        self.done_steps = 0
        self.trained_steps = 0
        self.trained_s = 0.0
        self.print_every_s = print_every_s
        self.count = 0
        self._seen: tuple[str, int, float] | None = None

    def shared_command(self) -> str:
        """The part of every run's command that is the same for all runs (``<name>`` stands for the run's name);
        with a run's own ``--set`` list (``run_sets``) it is that run's ``command.txt``. Large sweeps store this
        once instead of a full command per run."""
        cmd = ["python", "-m", "megatron_adamc.cli", "train", "--config", str(self.base)]
        cmd += ["--output-dir", str(self.runs_dir / "<name>")] + [a for s in self.common for a in ("--set", s)]
        return shlex.join(cmd)

    def run_sets(self, name: str) -> list[str]:
        """The run's own ``--set`` items (after the shared ones), from its saved overrides."""
        return json.loads((self.runs_dir / name / "overrides.json").read_text())[len(self.common) :]

    def diverged(self, name: str) -> dict[str, Any] | None:
        """``{"step", "error"}`` when the trainer stopped run ``name`` as diverged (exit 3), else None."""
        path = self.runs_dir / name / DIVERGED_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def run(
        self, name: str, overrides: list[str], steps: int, total_runs: int, may_diverge: bool = False
    ) -> list[dict[str, Any]]:
        """Train (or reuse) run ``name`` with the common overrides plus ``overrides``; return its metrics records.

        With ``may_diverge``, a run the trainer's divergence guard stops (exit 3) is a result, not a failure: its
        records end at the step it stopped at, and ``diverged(name)`` says so. Any other failure raises."""
        self.count += 1
        run_dir = self.runs_dir / name
        sets = self.common + overrides + [f"train.steps={steps}"]
        tag = f"[{self.count}/{total_runs}] {name}"
        saved = run_dir / "overrides.json"
        records = load_metrics(run_dir / "metrics.jsonl")
        ended = bool(records) and (records[-1]["step"] == steps or (may_diverge and self.diverged(name) is not None))
        if saved.is_file() and json.loads(saved.read_text()) == sets and ended:
            print(f"{tag}: reusing the finished run in {run_dir}", flush=True)
            self.done_steps += steps
            return records
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a different or unfinished run: the trainer would resume it, so start clean
        run_dir.mkdir(parents=True)
        cmd = [sys.executable, "-m", "megatron_adamc.cli", "train", "--config", str(self.base)]
        cmd += ["--output-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
        (run_dir / "command.txt").write_text("python " + shlex.join(cmd[1:]) + "\n")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        start = last_print = time.monotonic()
        print(f"{tag}: training {steps} steps -> {run_dir}", flush=True)
        with (run_dir / "train.log").open("w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    if time.monotonic() - last_print >= self.print_every_s:
                        last_print = time.monotonic()
                        self._progress(tag, run_dir, steps, time.monotonic() - start)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        elapsed = time.monotonic() - start
        records = load_metrics(run_dir / "metrics.jsonl")
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:] or ["(empty log)"]
        stopped = may_diverge and proc.returncode == DivergenceError.exit_code and bool(records)
        if stopped:
            (run_dir / DIVERGED_FILE).write_text(json.dumps({"step": records[-1]["step"], "error": tail[0]}) + "\n")
        elif proc.returncode != 0 or not records or records[-1]["step"] != steps:
            raise RuntimeError(f"{name}: the trainer exited with {proc.returncode}: {tail[0]} (log: {log.name})")
        saved.write_text(json.dumps(sets, indent=1) + "\n")
        self.done_steps += steps
        self.trained_steps += records[-1]["step"]  # a diverged run stopped early: its time is for fewer steps
        self.trained_s += elapsed
        left = self.total_steps - self.done_steps
        eta = left * self.trained_s / self.trained_steps
        loss = records[-1].get("loss", math.nan)
        done = f"diverged at step {records[-1]['step']} (the trainer stopped it)" if stopped else "done"
        print(
            f"{tag}: {done} in {_fmt_time(elapsed)}, final loss {loss:.4f}; experiment ETA {_fmt_time(eta)}",
            flush=True,
        )
        return records

    def _progress(self, tag: str, run_dir: Path, steps: int, elapsed: float) -> None:
        last = MetricsFile(run_dir).last_row()
        if last is None:
            print(f"{tag}: starting ({_fmt_time(elapsed)})", flush=True)
            return
        step, now = int(last.get("step", 0)), time.monotonic()
        if self._seen is None or self._seen[0] != tag:
            self._seen = (tag, step, now)  # rate from here on: start-up (data, DeepSpeed) excluded
        _, step0, t0 = self._seen
        per_step = (now - t0) / (step - step0) if step > step0 else elapsed / max(step, 1)
        run_eta = (steps - step) * per_step
        if self.trained_steps:
            per_step = self.trained_s / self.trained_steps  # includes start-up, so the experiment ETA is honest
        eta = run_eta + (self.total_steps - self.done_steps - steps) * per_step
        print(
            f"{tag}: step {step}/{steps} loss {last.get('loss', math.nan):.4f} | run ETA {_fmt_time(run_eta)} | "
            f"experiment ETA {_fmt_time(eta)}",
            flush=True,
        )


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample std (0 for one value): the spread over seeds that a difference is stated with."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold ``key``."""
    pairs = [(r["step"], float(r[key])) for r in records if key in r and r[key] is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def window_mean(records: list[dict[str, Any]], key: str, start: float, stop: float, steps: int) -> float:
    """Mean of ``key`` over the steps in (start*steps, stop*steps]: e.g. 0.4-0.6 or the last 5% (0.95-1.0)."""
    lo, hi = start * steps, stop * steps
    values = [float(r[key]) for r in records if key in r and lo < r["step"] <= hi]
    return sum(values) / len(values) if values else math.nan


def smooth(values: list[float], width: int) -> list[float]:
    """Trailing moving average, so per-step mini-batch noise does not hide the trend in the plots."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out
