"""Activation memory measured against the planner, per checkpointing mode, side by side in one run.

Usage: ``python benchmarks/activation_memory.py [--device cpu|cuda] [--dtype bf16|fp32] [--seq 512 --batch 2]
[--no-deepspeed]``

Part 1, for a few model shapes (Llama blocks, ``--seq`` x ``--batch`` tokens) and each checkpointing mode
(``full`` and ``selective`` once ``megatron_adamc.model.apply_activation_checkpointing`` exists): the bytes the
forward keeps for the backward and the step's peak (besides the parameters; gradients freed as they arrive), both
measured with torch's MemTracker, next to the planner's kept term and its bound (kept + one block's recomputation +
the loss-side temporaries). On a GPU the peak is also read from ``torch.cuda.max_memory_allocated``.

Part 2 (CPU, skipped by ``--no-deepspeed``): configs/train/llama_tiny.yaml's model on a real DeepSpeed engine (its
own JSON, one gloo rank), in a fresh process. The growth of the peak resident set from just before
``deepspeed.initialize`` through one step, against the planner's terms that live in host memory here
(everything but the parameters, which exist before, and the CUDA context and allocator slack, which a CPU does not
have). A rough check: the resident set also holds what the C allocator keeps after a free and the libraries loaded
on first use, and varies by tens of MiB from run to run; part 1 is the exact one.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_adamc.model import Llama, LlamaConfig  # noqa: E402
from megatron_adamc.plan.activations import activation_memory  # noqa: E402
from megatron_adamc.plan.measure import measure_activation_memory  # noqa: E402

MiB = 2**20
# (name, preset, overrides): real widths, depth cut so that a CPU measures them in seconds
SHAPES = [
    ("tiny", "tiny", {}),
    ("125M x 2 layers", "125M", {"n_layers": 2}),
    ("1B x 1 layer, 8k vocab", "1B", {"n_layers": 1, "vocab_size": 8192}),
]


def checkpointing_modes() -> list[str]:
    import megatron_adamc.model as model_package

    return ["none", "full", "selective"] if hasattr(model_package, "apply_activation_checkpointing") else ["none"]


def part1(device: torch.device, dtype: torch.dtype, seq: int, batch: int) -> list[str]:
    rows = [
        "| model | checkpointing | kept, measured MiB | kept, planned MiB | ratio | peak, measured MiB | "
        "plan bound MiB | peak / bound |" + (" cuda peak MiB |" if device.type == "cuda" else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else ""),
    ]
    for name, preset, overrides in SHAPES:
        cfg = LlamaConfig.from_preset(preset, **{"max_seq_len": max(seq, 256), **overrides})
        for mode in checkpointing_modes():
            torch.manual_seed(0)
            model = Llama(cfg).to(device=device, dtype=dtype)
            if mode != "none":
                from megatron_adamc.model import apply_activation_checkpointing

                apply_activation_checkpointing(model, mode)
            tokens, labels = torch.randint(0, cfg.vocab_size, (2, batch, seq), device=device)
            cuda_peak = ""
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            measured = measure_activation_memory(model, tokens, labels)
            if device.type == "cuda":
                cuda_peak = f" {(torch.cuda.max_memory_allocated() - base) / MiB:.1f} |"
            plan = activation_memory(cfg, seq, batch, mode, 2 if dtype != torch.float32 else 4)
            bound = plan.total + plan.logits_temporaries
            rows.append(
                f"| {name} | {mode} | {measured.kept / MiB:.2f} | {plan.kept / MiB:.2f} | "
                f"{measured.kept / plan.kept:.4f} | {measured.peak / MiB:.2f} | {bound / MiB:.2f} | "
                f"{measured.peak / bound:.3f} |{cuda_peak}"
            )
            del model
    return rows


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def part2() -> list[str]:
    """The tiny config on a real DeepSpeed engine: peak resident-set growth against the plan's host-side terms."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    from megatron_adamc.config.deepspeed_json import build_deepspeed_config
    from megatron_adamc.config.train import load_config
    from megatron_adamc.plan import Hardware, plan_run
    from megatron_adamc.train.build import build_engine, build_model

    deepspeed.init_distributed(dist_backend="gloo")
    config = load_config(REPO / "configs/train/llama_tiny.yaml")
    plan = plan_run(config, Hardware(1, 1, 80))
    tc = config.train
    model = build_model(config, plan.shape.model.vocab_size)  # the trainer's model and engine builders
    tokens, labels = torch.randint(0, plan.shape.model.vocab_size, (2, tc.micro_batch_size, tc.seq_len))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
    before = _rss_kib("VmRSS") * 1024
    engine = build_engine(config, model, build_deepspeed_config(config, 1))
    loss, _ = engine.module.loss(engine(tokens), labels)
    engine.backward(loss)
    engine.step()
    grown = _rss_kib("VmHWM") * 1024 - before
    states, act = plan.states, plan.activations
    bucket_used = min(plan.comm_buffers, plan.shape.zero.weight_bytes * 2 * plan.facts.params)
    host_side = {
        "grads": states.grads,
        "optimizer": states.optimizer,
        "activations (kept)": act.kept,
        "logits temporaries": act.logits_temporaries,
        "gradient bucket (the part written)": bucket_used,
    }
    planned = sum(host_side.values())
    rows = ["| llama_tiny.yaml on DeepSpeed (CPU) | MiB |", "|---|---:|"]
    rows += [f"| planned: {name} | {value / MiB:.1f} |" for name, value in host_side.items()]
    rows += [
        f"| **planned, sum** | **{planned / MiB:.1f}** |",
        f"| **measured: peak resident set growth, initialize + one step** | **{grown / MiB:.1f}** |",
        f"| measured / planned | {grown / planned:.2f} |",
        f"| (planned on a GPU, whole reduce bucket allocated: {plan.comm_buffers / MiB:.0f} MiB of buckets) | |",
    ]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-deepspeed", action="store_true", help="skip part 2 (the tiny config on DeepSpeed)")
    parser.add_argument("--deepspeed-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.deepspeed_child:
        print("\n".join(part2()))
        return 0
    if args.seq <= 0 or args.batch <= 0 or args.threads <= 0:
        parser.error("--seq, --batch and --threads must be positive")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"## Activation memory: measured (MemTracker) vs planned, {args.dtype}, {args.batch} x {args.seq} tokens, "
          f"{device}, torch {torch.__version__}\n")  # fmt: skip
    print("\n".join(part1(device, dtype, args.seq, args.batch)))
    if not args.no_deepspeed and device.type == "cpu":
        # A fresh process: memory that part 1 freed stays resident in the allocator and would hide the growth.
        child = subprocess.run(
            [sys.executable, __file__, "--deepspeed-child"], capture_output=True, text=True, check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )  # fmt: skip
        print("\n## configs/train/llama_tiny.yaml on a DeepSpeed engine: peak RSS growth vs plan\n")
        print("\n".join(line for line in child.stdout.splitlines() if line.startswith("|")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
