"""Step-time overhead of norm tracking, against the same per-layer norms through ``safe_get_full_*``.

Usage: ``python benchmarks/tracking_overhead.py [--rounds 4] [--steps 10]`` (launches 2 gloo ranks itself).

The tiny Llama preset, bf16, ZeRO 2, AdamC, 2 ranks. All modes run in ONE engine, interleaved in rounds of
``--steps`` steps each (so drifts of a shared machine hit all modes alike); the table gives the median block
time per step of each mode and its ratio to "off" (tracking disabled, hooks installed but idle).
"safe_get_full" gathers, per parameter, the full FP32 weight before and after the step and the full gradient,
and computes the same norms, ratio and cosine: the path DeepSpeed users have today.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(argv: list[str]) -> int:
    port, procs = _free_port(), []
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
    model = Llama(cfg, seed=0).to(torch.bfloat16)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamC", "params": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]}},
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
    }
    groups = mad.decay_param_groups(model, weight_decay=0.1)
    engine, _, _, _ = mad.initialize(model=model, model_parameters=groups, config=ds_config)
    plain = Tracker(engine, TrackingConfig(enabled=False, activations=True))
    low_precision = Tracker(engine, TrackingConfig(enabled=False, activations=True, low_precision=True))
    norms_only = Tracker(engine, TrackingConfig(enabled=False, activations=False))
    gen = torch.Generator().manual_seed(rank)

    extra: dict[str, list[float]] = {"safe_get_full": [], "end_step": []}

    def step(global_step: int, mode: str) -> None:
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        for tracker in (plain, low_precision, norms_only):
            tracker.begin_step(global_step)
        loss, _ = lm_loss(engine(tokens[:, :-1]), tokens[:, 1:])
        engine.backward(loss)
        before = None
        clock = time.process_time()
        if mode == "safe_get_full every step":
            before = {
                n: (safe_get_full_fp32_param(p).clone(), safe_get_full_grad(p).float().clone())
                for n, p in engine.module.named_parameters()
            }
        gather = time.process_time() - clock
        engine.step()
        if before is not None:
            clock = time.process_time()
            safe_get_full_norms(engine, before)
            extra["safe_get_full"].append(gather + time.process_time() - clock)
        clock = time.process_time()
        for tracker in (plain, low_precision, norms_only):
            tracker.end_step(global_step, loss=float(loss.detach()), grad_norm=engine.get_global_grad_norm())
        if mode == "tracking every step":
            extra["end_step"].append(time.process_time() - clock)

    modes = {
        "off": (plain, False, 1),
        "tracking every step": (plain, True, 1),
        "tracking every 10 steps": (plain, True, 10),
        "norms only (no activation hooks) every step": (norms_only, True, 1),
        "tracking+low precision every step": (low_precision, True, 1),
        "safe_get_full every step": (plain, False, 1),
    }
    # CPU time of this process per step: the machine is shared, and wall time there measures the neighbours.
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    global_step = 0
    for _ in range(3):  # warm-up: allocator, first FP8 history
        step(global_step, "off")
        global_step += 1
    for round_index in range(args.rounds + 1):
        for mode, (tracker, enabled, interval) in modes.items():
            for t in (plain, low_precision, norms_only):
                t.config.enabled = False
            tracker.config.enabled = enabled
            tracker.config.interval = interval
            global_step += (-global_step) % 10  # blocks start on a multiple of 10: one tracked step per block
            dist.barrier()
            start = time.process_time()
            for _ in range(args.steps):
                step(global_step, mode)
                global_step += 1
            elapsed = (time.process_time() - start) / args.steps
            if rank == 0:
                print(f"round {round_index} {mode}: {elapsed * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
            if round_index > 0:  # round 0 warms every mode up
                times[mode].append(elapsed)
    if rank == 0:
        base = statistics.median(times["off"])
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"\ntiny Llama ({n_params:.2f}M params, {len(list(model.parameters()))} tensors), bf16, ZeRO 2, 2 ranks,")
        print(
            f"micro-batch {args.batch}x{args.seq}, {args.rounds} rounds x {args.steps} steps per mode, "
            "CPU time of rank 0\n"
        )
        print("| mode | CPU ms/step (median of blocks) | ratio to off | spread (min-max) |")
        print("|---|---|---|---|")
        for mode, values in times.items():
            median = statistics.median(values)
            spread = f"{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}"
            print(f"| {mode} | {median * 1e3:.1f} | {median / base:.4f} | {spread} |")
        track = statistics.median(times["tracking every step"]) - base
        full = statistics.median(extra["safe_get_full"])
        end = statistics.median(extra["end_step"])
        print(f"\nsafe_get_full_* per step, timed directly: {full * 1e3:.2f} ms")
        print(
            f"tracker per tracked step: {track * 1e3:.2f} ms (step-time difference); end_step alone {end * 1e3:.2f} ms"
        )
        if track > 0:
            print(f"safe_get_full_* / tracker = {full / track:.1f}x")
        else:
            print(f"tracker cost below the noise; safe_get_full_* / end_step = {full / end:.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        return launch(sys.argv[1:])
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
