"""Step 5, Megatron-LM: its own ``pretrain_gpt.py`` through the plugin on a tiny Llama, 30 iterations, twice.

Distributed optimizer, bf16, mock data, Megatron's local transformer implementation when Transformer Engine is absent
(the device machine has neither TE nor apex: fused kernels that need them are turned off). With ``--adamc`` the
plugin logs ``adamc-weight-decay`` to TensorBoard beside Megatron's ``learning-rate``; every logged value must equal
weight_decay * lr / max_lr (to float32 rounding). The same run with ``--no-adamc`` gives the step-time baseline and
must log no AdamC decay. Megatron-LM is not on the package index: ``launch/gpu_wheels.sh`` carries the part it needs
in ``.whl/Megatron-LM`` (``MEGATRON_LM_PATH``); without a checkout the step is skipped. On the CPU Megatron stops at
its CUDA check (before it validates the flags), so there the step only probes that the checkout imports and its
early flag parse takes ``--adamc``.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path
from typing import Any

from gpu.common import StepContext, child_env, free_port, python_module, run_logged, table

ITERS, WARMUP_ITERS = 30, 5
LR, WEIGHT_DECAY = 1e-3, 0.1
RTOL = 1e-6  # TensorBoard stores float32: two roundings of ~6e-8 each
DECAY_TAG, LR_TAG = "adamc-weight-decay", "learning-rate"
ITERATION_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")


def model_args(tensorboard_dir: Path) -> list[str]:
    """docs/megatron.md's one-GPU smoke run, without the fused kernels that need Transformer Engine or apex."""
    return [
        "--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "688", "--num-attention-heads", "8",
        "--group-query-attention", "--num-query-groups", "2", "--seq-length", "512", "--max-position-embeddings", "512",
        "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", str(ITERS),
        "--lr", str(LR), "--min-lr", "1e-4", "--lr-warmup-iters", "5", "--lr-decay-style", "cosine",
        "--weight-decay", str(WEIGHT_DECAY), "--clip-grad", "1.0", "--seed", "1234",
        "--bf16", "--use-distributed-optimizer", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "32000", "--eval-iters", "1", "--eval-interval", "1000",
        "--log-interval", "1", "--log-throughput", "--tensorboard-dir", str(tensorboard_dir),
        "--transformer-impl", transformer_impl(), "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
        "--no-rope-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm",
    ]  # fmt: skip


def transformer_impl() -> str:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return "local"
    return "transformer_engine"


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of a TensorBoard folder: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def decay_against_formula(scalars: dict[str, dict[int, float]], lr_max: float, weight_decay: float) -> dict[str, Any]:
    """The logged AdamC decay at every iteration against weight_decay * lr / lr_max from the logged lr."""
    decay, lrs = scalars.get(DECAY_TAG, {}), scalars.get(LR_TAG, {})
    both = sorted(set(decay) & set(lrs))
    errors = [abs(decay[i] - weight_decay * lrs[i] / lr_max) / max(weight_decay * lrs[i] / lr_max, 1e-30) for i in both]
    return {
        "iterations_compared": len(both),
        "max_rel_error": max(errors) if errors else None,
        "decay_first_last": [decay[both[0]], decay[both[-1]]] if both else None,
        "lr_first_last": [lrs[both[0]], lrs[both[-1]]] if both else None,
    }


def iteration_log(text: str) -> dict[str, Any]:
    """Megatron's per-iteration stdout lines: elapsed ms and lm loss by iteration."""
    times = {int(i): float(ms) for i, ms in ITERATION_RE.findall(text)}
    losses = {int(i): float(v) for i, v in LOSS_RE.findall(text)}
    return {"times_ms": times, "losses": losses}


def launch(ctx: StepContext, name: str, adamc: bool, timeout: float):
    tb = ctx.work / f"tb-{name}"
    plugin = ["-m", "megatron_adamc.megatron.pretrain_gpt", *model_args(tb), "--adamc" if adamc else "--no-adamc"]
    if ctx.cpu:
        cmd = [sys.executable, *plugin]
    else:
        cmd = python_module("torch.distributed.run", "--nproc-per-node", "1", "--rdzv-backend", "c10d")
        cmd += ["--rdzv-endpoint", f"127.0.0.1:{free_port()}", *plugin]
    env = child_env(ctx.cpu, CUDA_DEVICE_MAX_CONNECTIONS="1")
    return run_logged(cmd, ctx.work / f"{name}.log", timeout, env=env), tb


def probe_on_cpu(ctx: StepContext) -> None:
    finished, _ = launch(ctx, "cpu-probe", adamc=True, timeout=min(ctx.left(), 180))
    text = finished.log.read_text(errors="replace")
    reached = "Megatron requires CUDA" in text
    found = "the checkout imported and read its flags with --adamc up to its CUDA check" if reached else None
    ctx.save(cpu_probe_ok=reached, skipped=f"Megatron-LM's pretrain_gpt needs CUDA; {found or finished.last_line()}")


def run(ctx: StepContext) -> bool | None:
    from megatron_adamc.megatron.megatron_lm import MegatronLMNotFound, locate_megatron_lm

    try:
        root = locate_megatron_lm()
    except MegatronLMNotFound as err:
        ctx.save(skipped=f"no Megatron-LM checkout: {err}")
        return None
    ctx.save(megatron_lm=str(root), transformer_impl=transformer_impl())
    if ctx.cpu:
        probe_on_cpu(ctx)
        return None
    runs: dict[str, dict[str, Any]] = {}
    for name, adamc, share in (("adamc", True, 0.55), ("plain", False, 1.0)):  # the first pays cold imports
        finished, tb = launch(ctx, name, adamc, timeout=max(ctx.left() * share, 1))
        text = finished.log.read_text(errors="replace")
        log = iteration_log(text)
        times = [ms for i, ms in sorted(log["times_ms"].items()) if i > WARMUP_ITERS]
        entry: dict[str, Any] = {"iterations": max(log["times_ms"], default=0)}
        entry["step_ms_median"] = statistics.median(times) if times else None
        entry["loss_first"] = log["losses"].get(1)
        entry["loss_last"] = log["losses"].get(ITERS)
        if finished.killed or finished.returncode != 0 or entry["iterations"] < ITERS:
            entry["error"] = f"{finished.killed or f'exit code {finished.returncode}'}: {finished.last_line()}"
            print(finished.tail(60), flush=True)
        if tb.is_dir():
            scalars = tensorboard_scalars(tb)
            entry["tags"] = sorted(scalars)
            if adamc:
                entry["decay"] = decay_against_formula(scalars, LR, WEIGHT_DECAY)
        runs[name] = entry
        ctx.save(runs=runs)
    adamc_run, plain = runs["adamc"], runs["plain"]
    if adamc_run.get("step_ms_median") and plain.get("step_ms_median"):
        ctx.save(step_time_ratio=adamc_run["step_ms_median"] / plain["step_ms_median"])
    decay = adamc_run.get("decay", {})
    checks = {
        "both ran 30 iterations": "error" not in adamc_run and "error" not in plain,
        "decay logged every iteration": decay.get("iterations_compared") == ITERS,
        "decay equals the formula": (decay.get("max_rel_error") or 1.0) <= RTOL,
        "no AdamC decay without --adamc": DECAY_TAG not in plain.get("tags", [DECAY_TAG]),
        "same first loss": adamc_run.get("loss_first") is not None
        and adamc_run.get("loss_first") == plain.get("loss_first"),
    }
    ctx.save(checks=checks)
    return all(checks.values())


def summary(record: dict[str, Any]) -> str:
    decay = record.get("runs", {}).get("adamc", {}).get("decay", {})
    parts = []
    if decay.get("max_rel_error") is not None:
        parts.append(f"decay vs formula max rel error {decay['max_rel_error']:.1e} over {decay['iterations_compared']}")
    if record.get("step_time_ratio"):
        parts.append(f"step time AdamC/plain {record['step_time_ratio']:.3f}")
    return "; ".join(parts)


def markdown(record: dict[str, Any]) -> str:
    runs = record.get("runs", {})
    if not runs:
        return ""
    rows = [
        [name, r.get("iterations"), r.get("step_ms_median"), r.get("loss_first"), r.get("loss_last"),
         r.get("error", "")]
        for name, r in runs.items()
    ]  # fmt: skip
    text = table(["run", "iterations", "step ms (median, after 5)", "loss at 1", "loss at 30", "error"], rows)
    if record.get("checks"):
        text += "\n\n" + table(["check", "passed"], [[k, v] for k, v in record["checks"].items()])
    return text
