"""Step-time overhead of norm tracking, against the same per-layer norms through ``safe_get_full_*``.

Usage: ``python benchmarks/tracking_overhead.py [--rounds 30] [--blocks 6] [--batch 8 --seq 256] [--dtype fp32|bf16]
[--output docs/results/tracking_overhead.json]``
(launches 2 gloo ranks itself).

The tiny Llama preset, ZeRO 2, AdamC, 2 ranks, by default the main job's micro-batch (8 x 256 tokens, fp32:
configs/train/llama_tiny.yaml). The master-weight part of the tracker costs the same at any batch (a few passes
over this rank's partition, two small all-reduces); the activation part (one pass over the tracked outputs, one
q k^T per layer) grows with the tokens as the step does. So the ratio falls as the step grows:
``--batch 2 --seq 64`` shows the worst case. All modes run in ONE engine: the per-step modes take turns step by
step, "every 10 steps" runs in blocks of 10 alternating with blocks of "off" (so a drift of a shared machine hits
all modes alike); the table gives the median CPU time per step of each mode and its ratio to "off" (tracking
disabled, hooks installed but idle: three trackers' in the per-step modes, one tracker's in the blocks, as a user
runs it).
"safe_get_full" gathers, per parameter, the full FP32 weight before and after the step and the full gradient,
and computes the same norms, ratio and cosine: the path DeepSpeed users have today.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_adamc.files import atomic_write_text
from megatron_adamc.ports import free_port


def launch(argv: list[str]) -> int:
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    return max(proc.wait() for proc in procs)


def safe_get_full_norms(engine, before: dict) -> dict[str, float]:
    """The per-layer metrics through DeepSpeed's public per-parameter API (one full gather per call)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        w0, g = before[name]
        w1 = safe_get_full_fp32_param(param)
        w, gn = w0.norm().item(), g.norm().item()
        out[f"weight_norm/{name}"] = w
        out[f"grad_norm/{name}"] = gn
        out[f"update_norm/{name}"] = (w1 - w0).norm().item()
        out[f"cos_weight_grad/{name}"] = (torch.dot(w0.reshape(-1), g.reshape(-1)) / max(w * gn, 1e-30)).item()
    return out


class TrackerClock:
    """CPU time spent inside the tracker's own code: hooks, the side max-logit, ``begin_step``/``end_step``.

    The step time of a 2-rank run on a shared 2-core machine varies by several percent from step to step, more
    than the tracker costs; this clock measures the tracker directly (nested calls are counted once).
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._depth = 0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.thread_time()  # this thread only: not gloo's or DeepSpeed's threads meanwhile
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.thread_time() - start
                self._depth -= 1

        return timed

    def instrument(self) -> None:
        """Wrap the tracker's entry points; before any Tracker exists (its hooks bind the methods at init)."""
        from megatron_adamc.model import llama
        from megatron_adamc.tracking import activations, master, tracker

        for cls, names in ((master.MasterStats, ("_pre", "_post")), (tracker.Tracker, ("begin_step", "end_step"))):
            for name in names:
                setattr(cls, name, self.wrap(getattr(cls, name)))
        for name in ("_linear_hook", "_attention_hook"):
            make = getattr(activations.ActivationStats, name)
            setattr(activations.ActivationStats, name, lambda stats, index, make=make: self.wrap(make(stats, index)))
        llama.causal_max_logit = self.wrap(llama.causal_max_logit)


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    import megatron_adamc.deepspeed as mad
    from megatron_adamc.model import LlamaConfig
    from megatron_adamc.model.llama import Llama
    from megatron_adamc.model.loss import lm_loss
    from megatron_adamc.tracking import Tracker, TrackingConfig

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    cfg = LlamaConfig.from_preset("tiny")
    model = Llama(cfg, seed=0)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamC", "params": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]}},
        "zero_optimization": {"stage": 2},
    }
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
        ds_config["bf16"] = {"enabled": True}
    groups = mad.decay_param_groups(model, weight_decay=0.1)
    engine, _, _, _ = mad.initialize(model=model, model_parameters=groups, config=ds_config)
    clock = TrackerClock()
    clock.instrument()
    # The alarm still scores every step, but its threshold is out of reach: the random tokens' falling grad norm
    # trips it in the blocks, and each spike tracks one more step (data-dependent, not the every-10 schedule).
    plain = Tracker(engine, TrackingConfig(enabled=False, activations=True, spike_zscore=1e9))
    low_precision = Tracker(engine, TrackingConfig(enabled=False, activations=True, low_precision=True))
    norms_only = Tracker(engine, TrackingConfig(enabled=False, activations=False))
    gen = torch.Generator().manual_seed(rank)

    extra: dict[str, list[float]] = {"safe_get_full": [], "end_step": []}
    own: dict[str, list[float]] = {}  # the tracker's own CPU time per step, by mode

    live = [plain, low_precision, norms_only]  # the trackers installed (hooks in place, begin/end_step called)

    def step(global_step: int, mode: str) -> None:
        clock.total = 0.0
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        for tracker in live:
            tracker.begin_step(global_step)
        loss, _ = lm_loss(engine(tokens[:, :-1]), tokens[:, 1:])
        engine.backward(loss)
        before = None
        start = time.process_time()
        if mode == "safe_get_full every step":
            before = {
                n: (safe_get_full_fp32_param(p).clone(), safe_get_full_grad(p).float().clone())
                for n, p in engine.module.named_parameters()
            }
        gather = time.process_time() - start
        engine.step()
        if before is not None:
            start = time.process_time()
            safe_get_full_norms(engine, before)
            extra["safe_get_full"].append(gather + time.process_time() - start)
        start = time.process_time()
        for tracker in live:
            tracker.end_step(global_step, loss=float(loss.detach()), grad_norm=engine.get_global_grad_norm())
        if mode == "tracking every step":
            extra["end_step"].append(time.process_time() - start)
        own.setdefault(mode, []).append(clock.total)

    per_step = {
        "off": (plain, False),
        "tracking every step": (plain, True),
        "norms only (no activation hooks) every step": (norms_only, True),
        "tracking+low precision every step": (low_precision, True),
        "safe_get_full every step": (plain, False),
    }

    def configure(tracker: Tracker, enabled: bool, interval: int) -> None:
        for t in (plain, low_precision, norms_only):
            t.config.enabled = False
        tracker.config.enabled = enabled
        tracker.config.interval = interval

    # CPU time of this process per step: the machine is shared, and wall time there measures the neighbours.
    # Per-step modes take turns step by step (a drift of the machine hits them alike; median over the steps);
    # "every 10 steps" is a property of a block, so blocks of it alternate with blocks of "off".
    times: dict[str, list[float]] = {mode: [] for mode in per_step}
    blocks: dict[str, list[float]] = {"off (blocks)": [], "tracking every 10 steps": []}
    global_step = 0
    for _ in range(3):  # warm-up: allocator, first FP8 history
        step(global_step, "off")
        global_step += 1
    for round_index in range(args.rounds + 1):
        for mode, (tracker, enabled) in per_step.items():
            configure(tracker, enabled, 1)
            dist.barrier()
            start = time.process_time()
            step(global_step, mode)
            global_step += 1
            if round_index > 0:  # round 0 warms every mode up
                times[mode].append(time.process_time() - start)
        if rank == 0 and round_index % 10 == 0:
            print(f"round {round_index}/{args.rounds} of the per-step modes", file=sys.stderr, flush=True)
    # The blocks run as a user would: ONE tracker installed (the other two closed: their idle hooks would be
    # counted in both block modes, 3x a user's idle cost).
    for tracker in (low_precision, norms_only):
        tracker.close()
    live[:] = [plain]
    for block_index in range(args.blocks):
        for mode, enabled in (("off (blocks)", False), ("tracking every 10 steps", True)):
            configure(plain, enabled, 10)
            global_step += (-global_step) % 10  # blocks start on a multiple of 10: one tracked step per block
            dist.barrier()
            start = time.process_time()
            for _ in range(10):
                step(global_step, mode)
                global_step += 1
            blocks[mode].append((time.process_time() - start) / 10)
        if rank == 0:
            print(f"block {block_index + 1}/{args.blocks} of every-10-steps", file=sys.stderr, flush=True)
    if rank == 0:
        report(args, model, times, blocks, extra, own)
    dist.destroy_process_group()  # a live gloo group can abort the interpreter's exit


def report(args: argparse.Namespace, model: torch.nn.Module, times: dict, blocks: dict, extra: dict, own: dict) -> None:
    median = {mode: statistics.median(values) for mode, values in {**times, **blocks}.items()}
    base, block_base = median["off"], median["off (blocks)"]
    rows = []
    for mode in {**times, **blocks}:
        ref = block_base if mode in blocks else base
        # Per-step modes: the median step; a block mode pays one tracked step in ten: the mean over its steps.
        mine = statistics.mean(own[mode]) if mode in blocks else statistics.median(own[mode])
        rows.append(
            {"mode": mode, "step_ms": median[mode] * 1e3, "step_ratio": median[mode] / ref, "own_ms": mine * 1e3}
        )
        rows[-1]["own_pct"] = 100 * rows[-1]["own_ms"] / (ref * 1e3)
    full = statistics.median(extra["safe_get_full"]) * 1e3
    result = {
        "setup": {
            "model": "tiny Llama",
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "tensors": len(list(model.parameters())),
            "zero_stage": 2,
            "ranks": 2,
            "batch": args.batch,
            "seq": args.seq,
            "dtype": args.dtype,
            "rounds": args.rounds,
            "blocks": args.blocks,
        },
        "rows": rows,
        "safe_get_full_ms": full,
        "end_step_ms": statistics.median(extra["end_step"]) * 1e3,
    }
    setup = result["setup"]
    print(f"\ntiny Llama ({setup['params_m']:.2f}M params, {setup['tensors']} tensors), {args.dtype}, ZeRO 2, 2 ranks,")
    print(
        f"micro-batch {args.batch}x{args.seq}; per-step modes alternate step by step ({args.rounds} steps each), "
        f"every-10 in {args.blocks} blocks of 10 alternating with blocks of off; CPU time of rank 0\n"
    )
    print("\n".join(table(result)))
    own_ms = {row["mode"]: row["own_ms"] for row in rows}
    print(f"\nsafe_get_full_* work per step, timed directly: {full:.2f} ms")
    print(f"tracker end_step (reductions + metric dict) alone: {result['end_step_ms']:.2f} ms")
    for mode in ("tracking every step", "norms only (no activation hooks) every step"):
        print(f"safe_get_full_* / tracker's own time, {mode}: {full / own_ms[mode]:.1f}x")
    if args.output:
        save(Path(args.output), f"{args.batch}x{args.seq} {args.dtype}", result)


def table(result: dict) -> list[str]:
    """The markdown table docs/tracking.md shows (tests/results_quotes_steady.py writes it from the JSON alike)."""
    lines = [
        "| mode | step ms (median) | step ratio to off | tracker's own ms per step | tracker / off step |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['mode']} | {row['step_ms']:.1f} | {row['step_ratio']:.4f} | {row['own_ms']:.2f} | "
            f"{row['own_pct']:.2f}% |"
        )
    return lines


def save(path: Path, key: str, result: dict) -> None:
    """One entry per micro-batch and dtype, the others kept (the docs quote several)."""
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    runs[key] = {**result, "date": time.strftime("%Y-%m-%d")}
    command = "python benchmarks/tracking_overhead.py [--batch B --seq S --dtype D] --output " + str(path)
    document = {"what": __doc__.splitlines()[0], "command": command, "runs": runs}
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")
    print(f"wrote {path} ({key})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="steps of each per-step mode")
    parser.add_argument("--blocks", type=int, default=6, help="blocks of 10 steps of every-10 (and of off)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--output", help="results JSON to add this run to (docs/results/tracking_overhead.json)")
    args = parser.parse_args()
    if min(args.rounds, args.blocks, args.batch, args.seq) < 1 or args.seq > 256:
        parser.error("--rounds, --blocks, --batch and --seq must be >= 1, and --seq <= 256 (the tiny preset's max)")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        parser.error(f"--output {args.output}: its folder does not exist (create it first)")
    if "RANK" not in os.environ:
        return launch(sys.argv[1:])
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
