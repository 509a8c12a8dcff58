"""Step 5, Megatron: the proof on the FP32 main params, then an unmodified Megatron-LM ``pretrain_gpt.py`` with AdamC.

1. ``megatron_proof.py`` (one GPU, in a process of its own): Megatron's real optimizer step (megatron-core DDP +
   DistributedOptimizer, bf16) against a hand-decayed reference AdamW on the captured FP32 main shards and Adam
   moments: AdamC, AdamC with ``--adamc-exclude output_layer``, and the stock scheduler as the control; then the
   per-layer tracker's share of the step.
2. Megatron-LM's own ``pretrain_gpt.py``, unmodified, on a tiny Llama for 20 iterations with ``--adamc
   --adamc-track-interval 5``: run through ``python -m megatron_adamc.autoload run`` (the start-up hook by hand: on the
   device machine the package is on PYTHONPATH, where no ``.pth`` file runs). Every logged ``adamc-weight-decay`` must
   equal weight_decay * lr / max_lr; the tracker's per-layer rows land in TensorBoard and ``metrics.jsonl``.
Megatron-LM is not on the package index: ``launch/gpu_wheels.sh`` carries it in ``.whl/Megatron-LM``
(``MEGATRON_LM_PATH``); without it part 2 is skipped. On the CPU only part 2's start is probed: Megatron-LM stops at
its CUDA check.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from gpu.common import StepContext, child_env, free_port, python_module, run_logged, table
from gpu.megatron_proof import checks as proof_checks

ITERS, WARMUP_ITERS, TRACK_INTERVAL = 20, 5, 5
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


def launch(ctx: StepContext, root: Path, name: str, flags: list[str], timeout: float):
    tb = ctx.work / f"tb-{name}"
    script = ["-m", "megatron_adamc.autoload", "run", str(root / "pretrain_gpt.py"), *model_args(tb), *flags]
    if ctx.cpu:
        cmd = [sys.executable, *script]
    else:
        cmd = python_module("torch.distributed.run", "--nproc-per-node", "1", "--rdzv-backend", "c10d")
        cmd += ["--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--no-python", sys.executable, *script]
    env = child_env(ctx.cpu, CUDA_DEVICE_MAX_CONNECTIONS="1")
    return run_logged(cmd, ctx.work / f"{name}.log", timeout, env=env), tb


def probe_on_cpu(ctx: StepContext, root: Path) -> None:
    finished, _ = launch(ctx, root, "cpu-probe", ["--adamc"], timeout=min(ctx.left(), 180))
    text = finished.log.read_text(errors="replace")
    reached = "Megatron requires CUDA" in text
    found = "the unmodified script imported with the hook and stopped at its CUDA check" if reached else None
    ctx.save(cpu_probe_ok=reached, skipped=f"Megatron-LM's pretrain_gpt needs CUDA; {found or finished.last_line()}")


def proof(ctx: StepContext, timeout: float) -> dict[str, Any]:
    """megatron_proof.run_proof in a process of its own (it owns the GPU and a NCCL group while it runs)."""
    out = ctx.work / "proof.json"
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from gpu.megatron_proof import run_proof; "
        "json.dump(run_proof(float(sys.argv[3])), open(sys.argv[2], 'w'))"
    )
    bench = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", code, str(bench), str(out), str(timeout)]
    finished = run_logged(cmd, ctx.work / "proof.log", timeout, env=child_env(False, CUDA_DEVICE_MAX_CONNECTIONS="1"))
    if not out.is_file():
        print(finished.tail(60), flush=True)
        return {"error": f"{finished.killed or f'exit code {finished.returncode}'}: {finished.last_line()}"}
    return json.loads(out.read_text())


def script_run(ctx: StepContext, root: Path, timeout: float) -> dict[str, Any]:
    flags = ["--adamc", "--adamc-track-interval", str(TRACK_INTERVAL), "--adamc-track-dir", str(ctx.work / "track")]
    finished, tb = launch(ctx, root, "adamc", flags, timeout)
    log = iteration_log(finished.log.read_text(errors="replace"))
    times = [ms for i, ms in sorted(log["times_ms"].items()) if i > WARMUP_ITERS]
    entry: dict[str, Any] = {"iterations": max(log["times_ms"], default=0)}
    entry["step_ms_median"] = statistics.median(times) if times else None
    if finished.killed or finished.returncode != 0 or entry["iterations"] < ITERS:
        entry["error"] = f"{finished.killed or f'exit code {finished.returncode}'}: {finished.last_line()}"
        print(finished.tail(60), flush=True)
    if tb.is_dir():
        scalars = tensorboard_scalars(tb)
        entry["decay"] = decay_against_formula(scalars, LR, WEIGHT_DECAY)
        entry["per_layer_tags"] = len([t for t in scalars if "/weight_norm/" in t or t.endswith("/weight_norm")])
    rows = [json.loads(line) for line in (ctx.work / "track" / "metrics.jsonl").read_text().splitlines()] if (
        ctx.work / "track" / "metrics.jsonl"
    ).is_file() else []  # fmt: skip
    entry["tracked_steps"] = [row["step"] for row in rows]
    entry["output_layer_corrected"] = rows[-1].get("adamc_corrected/output_layer.weight") if rows else None
    return entry


def run(ctx: StepContext) -> bool | None:
    from megatron_adamc.megatron.megatron_lm import MegatronLMNotFound, locate_megatron_lm

    try:
        root = locate_megatron_lm()
    except MegatronLMNotFound as err:
        root = None
        missing = f"no Megatron-LM checkout: {err}"
    if ctx.cpu:
        if root is None:
            ctx.save(skipped=missing)
        else:
            probe_on_cpu(ctx, root)
        return None
    record = proof(ctx, timeout=max(ctx.left() * 0.5, 1))
    ctx.save(proof=record)
    checks = proof_checks(record)
    if root is None:
        ctx.save(script_skipped=missing)
    else:
        ctx.save(megatron_lm=str(root), transformer_impl=transformer_impl())
        entry = script_run(ctx, root, timeout=max(ctx.left() - 5, 1))
        ctx.save(script=entry)
        decay = entry.get("decay", {})
        checks.update(
            {
                "pretrain_gpt.py (unmodified) ran 20 iterations with --adamc": "error" not in entry,
                "its logged decay equals the formula": (decay.get("max_rel_error") or 1.0) <= RTOL
                and decay.get("iterations_compared") == ITERS,
                "tracked every 5 iterations, to metrics.jsonl and TensorBoard": entry.get("tracked_steps")
                == list(range(TRACK_INTERVAL, ITERS + 1, TRACK_INTERVAL))
                and entry.get("per_layer_tags", 0) > 0,
                "the output layer marked uncorrected (default exclusion)": entry.get("output_layer_corrected") == 0.0,
            }
        )
    ctx.save(checks=checks)
    return all(checks.values())


def summary(record: dict[str, Any]) -> str:
    parts = []
    phases = record.get("proof", {}).get("phases", {})
    if phases:
        worst = max(max(p.get("max_rel_error", {"x": 1.0}).values()) for p in phases.values())
        parts.append(f"FP32 main params vs hand-decayed AdamW: max rel error {worst:.1e} over {len(phases)} phases")
    tracking = record.get("proof", {}).get("tracking")
    if tracking:
        parts.append(f"tracking every step +{tracking['overhead_every_step']:.1%}")
    decay = record.get("script", {}).get("decay", {})
    if decay.get("max_rel_error") is not None:
        parts.append(f"pretrain_gpt decay vs formula {decay['max_rel_error']:.1e}")
    return "; ".join(parts)


def markdown(record: dict[str, Any]) -> str:
    phases = record.get("proof", {}).get("phases", {})
    text = ""
    if phases:
        rows = [
            [name, p.get("inner"), p.get("shards"), *(p.get("max_rel_error", {}).get(k) for k in
             ("param", "exp_avg", "exp_avg_sq")), p.get("other_rule_max_rel_error"), p.get("error", "")]
            for name, p in phases.items()
        ]  # fmt: skip
        header = ["phase", "inner optimizer", "shards", "param rel err", "exp_avg", "exp_avg_sq", "other rule", "error"]
        text += table(header, rows)
    tracking = record.get("proof", {}).get("tracking")
    if tracking:
        text += "\n\n" + table(
            ["tracker", "step ms off", "step ms every step", "every step", "every 10 steps"],
            [["MegatronTracker", tracking["step_ms_off"], tracking["step_ms_every_step"],
              f"{tracking['overhead_every_step']:.2%}", f"{tracking['overhead_every_10_steps']:.3%}"]],
        )  # fmt: skip
    if record.get("checks"):
        text += "\n\n" + table(["check", "passed"], [[k, v] for k, v in record["checks"].items()])
    return text
