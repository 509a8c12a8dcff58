"""What the LLM experiments share: each run is one ``megatron-adamc train`` process, read back from metrics.jsonl.

A process per run keeps runs isolated (DeepSpeed's global state, RNG, memory) and makes every run a command a user
can repeat by hand: its exact ``--set`` list is saved beside its metrics. A finished run whose overrides match is
reused, so an interrupted experiment continues where it stopped. Independent runs go side by side, one per CPU core
(or GPU), each forked from a server that imported the trainer once (``_launcher``).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from megatron_adamc.errors import DivergenceError, UserError
from megatron_adamc.experiments import _launcher as launcher
from megatron_adamc.metrics_file import MetricsFile
from megatron_adamc.ports import free_port
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
T = TypeVar("T")
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
    workers: int | None = Field(
        None, ge=1, description="runs at once; default: one per GPU, else one per CPU core (a run is single-threaded)"
    )
    fork_server: bool = Field(
        True,
        description="fork each run from a process that imported the trainer once (saves ~10 s a run); false: a "
        "fresh `python -m megatron_adamc.cli train` per run, the command in its command.txt",
    )


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


class RunsStopped(RuntimeError):
    """A run was not started because another one failed or the experiment was interrupted."""


class RunQueue:
    """Runs trainer processes, ``workers`` at a time, and prints which run, its step, and the ETA of run and
    experiment. ``run`` trains one; ``parallel`` runs independent tasks (each a sequence of ``run`` calls)
    side by side: on a failure no new run starts and the running ones finish (their work is reused on a rerun);
    on Ctrl-C the running ones are killed."""

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
        self._free_gpus = _visible_gpus()  # one per run, handed out and back
        self.workers = cfg.workers or len(self._free_gpus) or len(os.sched_getaffinity(0))  # a run is one thread
        self.fork_server = cfg.fork_server
        self._lock = threading.Lock()
        self._stop = threading.Event()  # a task failed: start no new run
        self._abort = threading.Event()  # interrupted: kill the running ones
        self._ports: set[int] = set()

    def say(self, line: str) -> None:
        with self._lock:
            print(line, flush=True)

    def shared_command(self) -> str:
        """The part of every run's command that is the same for all runs (``<name>`` stands for the run's name);
        with a run's own ``--set`` list (``run_sets``) it is that run's ``command.txt``. Large sweeps store this
        once instead of a full command per run."""
        return shlex.join(launcher.train_command(self.base, self.runs_dir / "<name>", self.common))

    def run_sets(self, name: str) -> list[str]:
        """The run's own ``--set`` items (after the shared ones), from its saved overrides."""
        return json.loads((self.runs_dir / name / "overrides.json").read_text())[len(self.common) :]

    def diverged(self, name: str) -> dict[str, Any] | None:
        """``{"step", "error"}`` when the trainer stopped run ``name`` as diverged (exit 3), else None."""
        path = self.runs_dir / name / DIVERGED_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def parallel(self, tasks: list[Callable[[], T]]) -> list[T]:
        """Run independent ``tasks`` up to ``workers`` at a time; their results in the order given."""
        if self.workers == 1 or len(tasks) <= 1:
            return [task() for task in tasks]
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="run-queue")
        futures = [pool.submit(task) for task in tasks]
        try:
            for future in as_completed(futures):
                if future.exception() is not None:
                    self._stop.set()  # the running ones finish; nothing new starts
            return [f.result() for f in futures]
        except BaseException:
            self._stop.set()
            self._abort.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._abort.clear()

    def run(
        self, name: str, overrides: list[str], steps: int, total_runs: int, may_diverge: bool = False
    ) -> list[dict[str, Any]]:
        """Train (or reuse) run ``name`` with the common overrides plus ``overrides``; return its metrics records.

        With ``may_diverge``, a run the trainer's divergence guard stops (exit 3) is a result, not a failure: its
        records end at the step it stopped at, and ``diverged(name)`` says so. Any other failure raises."""
        if self._stop.is_set():
            raise RunsStopped(f"{name}: not started, another run failed or the experiment was interrupted")
        with self._lock:
            self.count += 1
            tag = f"[{self.count}/{total_runs}] {name}"
        run_dir = self.runs_dir / name
        sets = self.common + overrides + [f"train.steps={steps}"]
        saved = run_dir / "overrides.json"
        records = load_metrics(run_dir / "metrics.jsonl")
        ended = bool(records) and (records[-1]["step"] == steps or (may_diverge and self.diverged(name) is not None))
        if saved.is_file() and json.loads(saved.read_text()) == sets and ended:
            self.say(f"{tag}: reusing the finished run in {run_dir}")
            with self._lock:
                self.done_steps += steps
            return records
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a different or unfinished run: the trainer would resume it, so start clean
        run_dir.mkdir(parents=True)
        (run_dir / "command.txt").write_text(shlex.join(launcher.train_command(self.base, run_dir, sets)) + "\n")
        self.say(f"{tag}: training {steps} steps -> {run_dir}")
        start = time.monotonic()
        returncode = self._train(sets, run_dir, tag, steps)
        elapsed = time.monotonic() - start
        records = load_metrics(run_dir / "metrics.jsonl")
        log = run_dir / "train.log"
        tail = log.read_text().strip().splitlines()[-1:] or ["(empty log)"]
        stopped = may_diverge and returncode == DivergenceError.exit_code and bool(records)
        if stopped:
            (run_dir / DIVERGED_FILE).write_text(json.dumps({"step": records[-1]["step"], "error": tail[0]}) + "\n")
        elif returncode != 0 or not records or records[-1]["step"] != steps:
            raise RuntimeError(f"{name}: the trainer exited with {returncode}: {tail[0]} (log: {log})")
        saved.write_text(json.dumps(sets, indent=1) + "\n")
        with self._lock:
            self.done_steps += steps
            self.trained_steps += records[-1]["step"]  # a diverged run stopped early: its time is for fewer steps
            self.trained_s += elapsed
            eta = self._eta(self.total_steps - self.done_steps)
        loss = records[-1].get("loss", math.nan)
        done = f"diverged at step {records[-1]['step']} (the trainer stopped it)" if stopped else "done"
        self.say(f"{tag}: {done} in {_fmt_time(elapsed)}, final loss {loss:.4f}; experiment ETA {_fmt_time(eta)}")
        return records

    def _eta(self, steps_left: float) -> float:
        """Seconds for ``steps_left`` more steps at the rate so far (start-up included), ``workers`` at a time."""
        if not self.trained_steps:
            return math.nan
        return steps_left * self.trained_s / self.trained_steps / self.workers

    def _train(self, sets: list[str], run_dir: Path, tag: str, steps: int) -> int:
        """One trainer process with its own rendezvous port (and GPU), watched until it ends; its exit code."""
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with self._lock:
            port = free_port(self._ports)
            self._ports.add(port)
            gpu = self._free_gpus.pop() if self._free_gpus else None
        env["MASTER_PORT"] = str(port)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        try:
            proc = launcher.start(self.base, run_dir, sets, env, run_dir / "train.log", self.fork_server)
            start = last_print = time.monotonic()
            seen: dict[str, float] = {}
            try:
                while proc.poll() is None:
                    if self._abort.wait(0.5):
                        raise RunsStopped(f"{tag}: killed, the experiment was interrupted")
                    if time.monotonic() - last_print >= self.print_every_s:
                        last_print = time.monotonic()
                        self._progress(tag, run_dir, steps, time.monotonic() - start, seen)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            return proc.wait()
        finally:
            with self._lock:
                self._ports.discard(port)
                if gpu is not None:
                    self._free_gpus.append(gpu)

    def _progress(self, tag: str, run_dir: Path, steps: int, elapsed: float, seen: dict[str, float]) -> None:
        last = MetricsFile(run_dir).last_row()
        if last is None:
            self.say(f"{tag}: starting ({_fmt_time(elapsed)})")
            return
        step, now = int(last.get("step", 0)), time.monotonic()
        if not seen:
            seen.update(step=step, time=now)  # rate from here on: start-up (data, DeepSpeed) excluded
        step0, t0 = seen["step"], seen["time"]
        per_step = (now - t0) / (step - step0) if step > step0 else elapsed / max(step, 1)
        run_eta = (steps - step) * per_step
        with self._lock:
            left = self.total_steps - self.done_steps - steps
            rest = self._eta(left) if self.trained_steps else left * per_step / self.workers
        self.say(
            f"{tag}: step {step}/{steps} loss {last.get('loss', math.nan):.4f} | run ETA {_fmt_time(run_eta)} | "
            f"experiment ETA {_fmt_time(run_eta + max(rest, 0.0))}"
        )


def _visible_gpus() -> list[str]:
    """The GPU ids a run can be pinned to (CUDA_VISIBLE_DEVICES of one each), none on a CPU machine."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


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
