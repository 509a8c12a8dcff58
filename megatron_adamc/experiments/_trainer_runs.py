"""What the LLM experiments share: each run is one ``megatron-adamc train`` process, read back from metrics.jsonl.

A process per run keeps runs isolated (DeepSpeed's global state, RNG, memory) and makes every run a command a user
can repeat by hand: its exact ``--set`` list is saved beside its metrics. A finished run whose overrides match is
reused, so an interrupted experiment continues where it stopped. Independent runs go side by side, one per CPU core
(or GPU), on the standard library's process pool, each in a worker forked from a server that imported the trainer
once (``_launcher``). The experiment's own logic stays in one thread: a task is a generator of runs.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import time
from collections import deque
from collections.abc import Generator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
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
        None,
        description="default: ~/.cache/megatron-adamc/experiments-v<vocab_size> (+ -<max_bytes>B unless 8000000), "
        "apart from the trainer's cache",
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


def data_cache(cfg: LlmConfig) -> str:
    """The corpus cache of an experiment: one per vocabulary and corpus size (a cache is rebuilt in place when either
    changes, so experiments of different sizes must not share one)."""
    size = "" if cfg.max_bytes == 8_000_000 else f"-{cfg.max_bytes}B"
    return cfg.data_cache_dir or f"~/.cache/megatron-adamc/experiments-v{cfg.vocab_size}{size}"


def common_overrides(cfg: LlmConfig) -> list[str]:
    """The trainer ``--set`` list every run of an experiment shares: model, data, and no per-run overhead."""
    cache = data_cache(cfg)
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


@dataclass(frozen=True)
class Run:
    """One trainer run of a task: its name (its directory under runs/), its own ``--set`` items after the shared
    ones, its steps, and whether the divergence guard stopping it (exit 3) is a result rather than a failure."""

    name: str
    overrides: list[str]
    steps: int
    may_diverge: bool = False


# A task is a generator: it yields the runs it needs one after another, receives each one's metrics records, and
# returns its result (a lambda ladder that stops after divergences is one task). Independent tasks go side by side.
Task = Generator[Run, list[dict[str, Any]], T]


def one_run(run: Run) -> Task[list[dict[str, Any]]]:
    """The task of a single run: its records."""
    return (yield run)


@dataclass
class _Started:
    task: int
    run: Run
    tag: str
    port: int
    gpu: str | None
    start: float = field(default_factory=time.monotonic)
    seen: dict[str, float] = field(default_factory=dict)


class RunQueue:
    """Runs trainer processes on a process pool, ``workers`` at a time, from one thread, and prints which run, its
    step, and the ETA of run and experiment. ``parallel`` drives independent tasks side by side: on a failure no
    new run starts and the running ones finish (their work is reused on a rerun), then the first failure is raised;
    on Ctrl-C the running ones are killed. ``run`` trains one run."""

    def __init__(
        self, cfg: LlmConfig, output_dir: Path, total_steps: int, total_runs: int = 0, print_every_s: float = 15.0
    ) -> None:
        self.base = base_config_path(cfg)
        self.common = common_overrides(cfg) + list(cfg.extra)
        self.runs_dir = output_dir / "runs"
        self.total_steps = total_steps  # over all runs, for the experiment's ETA
        self.total_runs = total_runs  # for the "[k/n]" tag; 0: not shown
        self.done_steps = 0
        self.trained_steps = 0
        self.trained_s = 0.0
        self.print_every_s = print_every_s
        self.count = 0
        self._free_gpus = _visible_gpus()  # one per run, handed out and back
        self.workers = cfg.workers or len(self._free_gpus) or len(os.sched_getaffinity(0))  # a run is one thread
        self.fork_server = cfg.fork_server
        self._ports: set[int] = set()

    def say(self, line: str) -> None:
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

    def run(self, name: str, overrides: list[str], steps: int, may_diverge: bool = False) -> list[dict[str, Any]]:
        """Train (or reuse) run ``name`` with the common overrides plus ``overrides``; return its metrics records.

        With ``may_diverge``, a run the trainer's divergence guard stops (exit 3) is a result, not a failure: its
        records end at the step it stopped at, and ``diverged(name)`` says so. Any other failure raises."""
        return self.parallel([one_run(Run(name, overrides, steps, may_diverge))])[0]

    def parallel(self, tasks: list[Task[T]]) -> list[T]:
        """Drive independent ``tasks`` to their end, their runs ``workers`` at a time; their results in the order
        given."""
        results: dict[int, T] = {}
        ready: deque[tuple[int, Run]] = deque()
        running: dict[Future[int], _Started] = {}
        failure: BaseException | None = None

        def advance(index: int, records: list[dict[str, Any]] | None) -> None:
            """Send ``records`` to task ``index``; queue the run it asks for next (reusing finished ones)."""
            try:
                while True:
                    run = tasks[index].send(records)  # type: ignore[arg-type]  # None starts the generator
                    records = self._reused(run)
                    if records is None:
                        ready.append((index, run))
                        return
            except StopIteration as stop:
                results[index] = stop.value

        pool = launcher.TrainerPool(self.workers, self.fork_server)
        try:
            for index in range(len(tasks)):
                try:
                    advance(index, None)
                except Exception as err:  # the first failure is raised once the running runs end
                    failure = failure or err
            last_print = time.monotonic()
            while running or (ready and failure is None):
                while ready and failure is None and len(running) < self.workers:
                    started = self._start(*ready.popleft())
                    running[self._submit(pool, started)] = started
                done, _ = wait(running, timeout=self.print_every_s, return_when=FIRST_COMPLETED)
                for future in done:
                    started = running.pop(future)
                    try:
                        records = self._finish(started, future)
                        advance(started.task, records)
                    except Exception as err:  # no new run starts; the running ones finish
                        failure = failure or err
                if time.monotonic() - last_print >= self.print_every_s:
                    last_print = time.monotonic()
                    for started in running.values():
                        self._progress(started)
        except BaseException:
            pool.kill()  # Ctrl-C: the running runs die with their workers, no overrides.json is written for them
            raise
        finally:
            pool.close()
        if failure is not None:
            raise failure
        return [results[i] for i in range(len(tasks))]

    def _reused(self, run: Run) -> list[dict[str, Any]] | None:
        """The records of ``run`` when it finished before with the same overrides, else None."""
        run_dir = self.runs_dir / run.name
        saved = run_dir / "overrides.json"
        records = load_metrics(run_dir / "metrics.jsonl")
        ended = bool(records) and (
            records[-1]["step"] == run.steps or (run.may_diverge and self.diverged(run.name) is not None)
        )
        if not (saved.is_file() and json.loads(saved.read_text()) == self._sets(run) and ended):
            return None
        self.count += 1
        self.say(f"{self._tag(run)}: reusing the finished run in {run_dir}")
        self.done_steps += run.steps
        return records

    def _sets(self, run: Run) -> list[str]:
        return self.common + run.overrides + [f"train.steps={run.steps}"]

    def _tag(self, run: Run) -> str:
        return f"[{self.count}/{self.total_runs}] {run.name}" if self.total_runs else run.name

    def _start(self, index: int, run: Run) -> _Started:
        """A clean run directory with its command.txt, a rendezvous port (and a GPU) of its own."""
        self.count += 1
        run_dir = self.runs_dir / run.name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a different or unfinished run: the trainer would resume it, so start clean
        run_dir.mkdir(parents=True)
        command = launcher.train_command(self.base, run_dir, self._sets(run))
        (run_dir / "command.txt").write_text(shlex.join(command) + "\n")
        port = free_port(self._ports)
        self._ports.add(port)
        started = _Started(index, run, self._tag(run), port, self._free_gpus.pop() if self._free_gpus else None)
        self.say(f"{started.tag}: training {run.steps} steps -> {run_dir}")
        return started

    def _submit(self, pool: launcher.TrainerPool, started: _Started) -> Future[int]:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env["MASTER_PORT"] = str(started.port)
        if started.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = started.gpu
        run_dir = self.runs_dir / started.run.name
        return pool.submit(self.base, run_dir, self._sets(started.run), env, run_dir / "train.log")

    def _finish(self, started: _Started, future: Future[int]) -> list[dict[str, Any]]:
        """The ended run's records; exit 3 of a ``may_diverge`` run is recorded as a result, anything else raises."""
        self._ports.discard(started.port)
        if started.gpu is not None:
            self._free_gpus.append(started.gpu)
        run, run_dir = started.run, self.runs_dir / started.run.name
        elapsed = time.monotonic() - started.start
        log = run_dir / "train.log"
        try:
            returncode = future.result()
        except BrokenProcessPool as err:  # a worker died (killed, out of memory): the pool ends every run with it
            raise RuntimeError(f"{run.name}: its process ended abruptly ({err}) (log: {log})") from None
        records = load_metrics(run_dir / "metrics.jsonl")
        tail = log.read_text().strip().splitlines()[-1:] or ["(empty log)"]
        stopped = run.may_diverge and returncode == DivergenceError.exit_code and bool(records)
        if stopped:
            (run_dir / DIVERGED_FILE).write_text(json.dumps({"step": records[-1]["step"], "error": tail[0]}) + "\n")
        elif returncode != 0 or not records or records[-1]["step"] != run.steps:
            raise RuntimeError(f"{run.name}: the trainer exited with {returncode}: {tail[0]} (log: {log})")
        (run_dir / "overrides.json").write_text(json.dumps(self._sets(run), indent=1) + "\n")
        self.done_steps += run.steps
        self.trained_steps += records[-1]["step"]  # a diverged run stopped early: its time is for fewer steps
        self.trained_s += elapsed
        eta = self._eta(self.total_steps - self.done_steps)
        loss = records[-1].get("loss", math.nan)
        done = f"diverged at step {records[-1]['step']} (the trainer stopped it)" if stopped else "done"
        self.say(
            f"{started.tag}: {done} in {_fmt_time(elapsed)}, final loss {loss:.4f}; experiment ETA {_fmt_time(eta)}"
        )
        return records

    def _eta(self, steps_left: float) -> float:
        """Seconds for ``steps_left`` more steps at the rate so far (start-up included), ``workers`` at a time."""
        if not self.trained_steps:
            return math.nan
        return steps_left * self.trained_s / self.trained_steps / self.workers

    def _progress(self, started: _Started) -> None:
        run_dir, steps, seen = self.runs_dir / started.run.name, started.run.steps, started.seen
        elapsed = time.monotonic() - started.start
        last = MetricsFile(run_dir).last_row()
        if last is None:
            self.say(f"{started.tag}: starting ({_fmt_time(elapsed)})")
            return
        step, now = int(last.get("step", 0)), time.monotonic()
        if not seen:
            seen.update(step=step, time=now)  # rate from here on: start-up (data, DeepSpeed) excluded
        step0, t0 = seen["step"], seen["time"]
        per_step = (now - t0) / (step - step0) if step > step0 else elapsed / max(step, 1)
        run_eta = (steps - step) * per_step
        left = self.total_steps - self.done_steps - steps
        rest = self._eta(left) if self.trained_steps else left * per_step / self.workers
        self.say(
            f"{started.tag}: step {step}/{steps} loss {last.get('loss', math.nan):.4f} | "
            f"run ETA {_fmt_time(run_eta)} | experiment ETA {_fmt_time(run_eta + max(rest, 0.0))}"
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
