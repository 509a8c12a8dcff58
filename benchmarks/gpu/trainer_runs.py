"""The trainer and the memory planner as a user runs them: ``python -m megatron_adamc.cli train|plan`` subprocesses.

Only the command line and ``metrics.jsonl`` (through ``MetricsFile``) are used, so the check does not depend on the
trainer's insides. A benchmark run is stopped as soon as it has logged the steps asked for: the final evaluation and
checkpoint (gigabytes at 1B parameters) are not waited for.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import dataclass
from typing import Any

from gpu.common import BASE_CONFIG, CONFIGS, StepContext, child_env, python_module, run_logged
from megatron_adamc.metrics_file import LOSS, MFU, PEAK_MEMORY_GB, STEP, STEP_TIME_S, TOKENS_PER_S, MetricsFile

# Model shapes by name; on the CPU the same code paths at sizes that train in seconds.
MODELS: dict[str, list[str]] = {
    # The presets at their published shapes (vocab 32000: the tokenizer's 4096 ids fit in it, the cost is real).
    "125M": ["model.preset=125M", "model.vocab_size=32000", "train.seq_len=2048", "train.micro_batch_size=16"],
    "1B": ["model.preset=1B", "model.vocab_size=32000", "train.seq_len=2048", "train.micro_batch_size=8"],
    "micro": [
        "model.preset=tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_dim=128", "train.seq_len=64", "train.micro_batch_size=2",
    ],
    "tiny": ["model.preset=tiny", "train.seq_len=128", "train.micro_batch_size=4"],
}  # fmt: skip

# The default corpus: enough tokens for a few hundred 2048-token sequences on a GPU; the test suite's small corpus
# (tests/conftest.py SMALL_TRAIN_SETS: same vocabulary and size, so its cache is reused) on the CPU.
GPU_DATA = {"vocab_size": 4096, "max_bytes": 8_000_000}
CPU_DATA = {"vocab_size": 512, "max_bytes": 400_000}


def data_settings(cpu: bool) -> dict[str, int]:
    return CPU_DATA if cpu else GPU_DATA


def base_sets(ctx: StepContext, fused_adam: bool = True) -> list[str]:
    """What every benchmark run shares: bf16 ZeRO-1 (DeepSpeed's FusedAdam unless its build failed), no per-step
    extras (tracking, TensorBoard, progress bar), no evaluation or checkpoint inside the measured steps."""
    data = data_settings(ctx.cpu)
    return [
        f"train.deepspeed={CONFIGS / 'deepspeed' / 'zero1_bf16.json'}",
        f"optimizer.torch_adam={'false' if fused_adam else 'true'}",
        "optimizer.lr=3e-4",  # the tiny config's 3e-3 is too hot for 1B in bf16; speed does not depend on it
        "tracking.enabled=false",
        "logging.interval=1",
        "logging.tensorboard=false",
        "logging.progress=false",
        "eval.interval=1000000",
        "eval.batches=1",
        "checkpoint.interval=1000000",
        "checkpoint.keep=1",
        "scheduler.warmup_steps=5",
        f"data.cache_dir={ctx.data_cache}",
        f"data.vocab_size={data['vocab_size']}",
        f"data.max_bytes={data['max_bytes']}",
    ]


def fused_adam_built(ctx: StepContext) -> bool:
    """Whether the runs can use DeepSpeed's FusedAdam: yes when the parity step built it, or did not run (a second
    try: the build is cached); else torch's AdamW kernel, so that a failed or killed build is not paid again per run."""
    parity = ctx.earlier.get("parity")
    return parity is None or parity.get("fused_adam_built") is True


@dataclass
class TrainerRun:
    name: str
    rows: list[dict[str, Any]]
    info: dict[str, Any]  # run.json, when the trainer wrote one
    error: str | None
    seconds: float
    gpu_memory_used_gib: float | None  # nvidia-smi's peak over the run (whole GPU: context and allocator cache too)


def run_trainer(
    ctx: StepContext, name: str, sets: list[str], steps: int, timeout: float, schedule_steps: int | None = None
) -> TrainerRun:
    """Trains ``steps`` steps (the lr schedule spans ``schedule_steps``, default 1000) and returns the logged rows."""
    run_dir = ctx.work / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a run directory is resumed by the trainer: start clean
    span = schedule_steps or max(1000, steps + 1)
    args = ["train", "--config", str(BASE_CONFIG), "--output-dir", str(run_dir)]
    for item in [*sets, f"train.steps={span}"]:
        args += ["--set", item]
    metrics = MetricsFile(run_dir)
    memory = GpuMemoryPeak(ctx.cpu)

    def logged_enough() -> bool:
        memory.sample()
        return metrics.read().last_step() >= steps

    finished = run_logged(
        python_module("megatron_adamc.cli", *args),
        ctx.work / f"{name}.log",
        timeout,
        env=child_env(ctx.cpu),
        stop_when=logged_enough,
    )
    rows = [row for row in metrics.read().rows if row[STEP] <= steps]
    error = None
    if finished.killed != "done" and (finished.returncode != 0 or len(rows) < steps):
        why = finished.killed or f"exit code {finished.returncode}"
        error = f"{name}: {why} after {len(rows)}/{steps} steps: {finished.last_line()}"
        print(f"--- {name} failed; the end of its log:\n{finished.tail(40)}", flush=True)
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return TrainerRun(name, rows, info, error, finished.seconds, memory.peak_gib)


class GpuMemoryPeak:
    """The GPU's used memory as nvidia-smi reports it (GiB), sampled each second while a run goes: what the planner's
    total stands for (CUDA context and the allocator's cache included), and it needs nothing from the trainer."""

    def __init__(self, cpu: bool) -> None:
        self.peak_gib: float | None = None
        self.enabled = not cpu and shutil.which("nvidia-smi") is not None
        self._next = 0.0

    def sample(self) -> None:
        import subprocess
        import time

        if not self.enabled or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + 1.0
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10,
            ).stdout.split()  # fmt: skip
            used = max(float(v) for v in out) / 1024  # MiB -> GiB
        except (OSError, ValueError, subprocess.SubprocessError):
            return
        self.peak_gib = max(used, self.peak_gib or 0.0)


def summarize(run: TrainerRun, warmup: int) -> dict[str, Any]:
    """Throughput over the steps after ``warmup``: tokens/s = tokens / seconds over them (the trainer's own
    ``step_time_s``), MFU scaled from the trainer's per-step figure, the peak memory the trainer logged."""
    measured = [r for r in run.rows if r[STEP] > warmup]
    out: dict[str, Any] = {"run": run.name, "steps": len(run.rows), "seconds": round(run.seconds, 1)}
    if run.info:
        out["params"] = run.info.get("num_params")
        out["precision"] = run.info.get("precision")
        out["zero_stage"] = run.info.get("zero_stage")
    if run.error:
        out["error"] = run.error
    if not measured:
        return out
    times = [float(r[STEP_TIME_S]) for r in measured]
    tokens_per_step = float(measured[0][TOKENS_PER_S]) * float(measured[0][STEP_TIME_S])
    out["tokens_per_step"] = round(tokens_per_step)
    out["tokens_per_s"] = tokens_per_step * len(times) / sum(times)
    out["step_time_s_median"] = statistics.median(times)
    out["step_time_s_mean"] = statistics.fmean(times)
    mfu = [float(r[MFU]) / float(r[TOKENS_PER_S]) for r in measured if isinstance(r.get(MFU), (int, float))]
    if mfu:
        out["mfu"] = mfu[0] * out["tokens_per_s"]  # MFU is tokens/s times a constant (FLOPs per token / peak)
    # The trainer logs torch's peak allocation in GB (1e9); the planner and nvidia-smi count GiB.
    peaks = [float(r[PEAK_MEMORY_GB]) for r in run.rows if isinstance(r.get(PEAK_MEMORY_GB), (int, float))]
    out["peak_allocated_gib"] = max(peaks) * 1e9 / 2**30 if peaks else None
    out["gpu_memory_used_gib"] = run.gpu_memory_used_gib
    losses = [float(r[LOSS]) for r in run.rows if isinstance(r.get(LOSS), (int, float))]
    out["loss_first"], out["loss_last"] = (losses[0], losses[-1]) if losses else (None, None)
    out["finite"] = bool(losses) and all(math.isfinite(v) for v in losses)
    return out


def plan_memory(ctx: StepContext, name: str, sets: list[str], gpu_memory_gb: float = 141.0) -> dict[str, Any]:
    """``megatron-adamc plan --json`` for the same config: its prediction, or why there is none (the sub-command is
    new and may be missing in this tree)."""
    args = ["plan", "--config", str(BASE_CONFIG), "--nodes", "1", "--gpus-per-node", "1"]
    args += ["--gpu-memory-gb", str(gpu_memory_gb), "--json"]
    for item in sets:
        args += ["--set", item]
    finished = run_logged(
        python_module("megatron_adamc.cli", *args), ctx.work / f"{name}.plan.log", timeout=120, env=child_env(ctx.cpu)
    )
    text = finished.log.read_text(errors="replace")
    start = text.find("{")
    if finished.returncode in (0, 1) and start >= 0:  # 0: fits, 1: does not fit; both print the object
        try:
            plan, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            plan = None
        if isinstance(plan, dict):  # its "gb" are GiB
            total = (plan.get("per_gpu_gb") or {}).get("total")
            buffers = plan.get("buffers_gb") or {}
            unallocated = sum(buffers.get(k) or 0.0 for k in ("cuda_context", "fragmentation"))
            allocated = total - unallocated if isinstance(total, (int, float)) else None
            return {"total_gib": total, "allocated_gib": allocated, "fits": plan.get("fits"),
                    "params": plan.get("params"), "raw": plan}  # fmt: skip
    if "invalid choice: 'plan'" in text:
        return {"error": "not available: this tree has no `megatron-adamc plan` sub-command"}
    return {"error": f"plan exited {finished.returncode}: {finished.last_line()}"}
