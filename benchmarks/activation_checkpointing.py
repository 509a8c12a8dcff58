"""Activation memory and step time with activation checkpointing none / full / selective, side by side.

Usage: ``python benchmarks/activation_checkpointing.py [--dim 256 --layers 6 --batch 2 --seq 1024]
[--repeats 3] [--device cpu|cuda] [--dtype fp32|bf16]``

Per mode, on the same model and batch:

- kept after the forward: bytes of the tensors alive when the forward (and the loss) is done, i.e. what autograd
  holds for the backward: counted exactly, storage by storage (``megatron_adamc.model.measure_activation_memory``);
- peak over forward + backward, the same way (gradients included);
- on CPU, the peak RSS of a fresh process doing one forward + backward, minus its RSS just before (what ``top``
  shows; glibc's mmap threshold is fixed at 64 KiB so that freed activations leave the RSS); on CUDA,
  ``max_memory_allocated`` over the step minus the allocation before it (the caching allocator's view);
- forward + backward time, median of ``--repeats`` (after one warm-up; the modes take turns), and its ratio to
  ``none``.

The theory: ``full`` keeps one block input per layer; ``selective`` keeps the block input and the outputs of the
matmuls and of attention (docs/model.md "Activation checkpointing"); tests/test_activation_checkpointing.py checks
both to the byte.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

MODES = ("none", "full", "selective")
MIB = 2**20


def build(args: argparse.Namespace, mode: str):
    from megatron_adamc.model import Llama, LlamaConfig, apply_activation_checkpointing

    ffn = -(-8 * args.dim // 3 // 64) * 64  # Llama's 8/3 d, rounded up to a multiple of 64
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                      ffn_dim=ffn, vocab_size=args.vocab, max_seq_len=args.seq)  # fmt: skip
    model = Llama(cfg, seed=0).to(args.device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    apply_activation_checkpointing(model, mode)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(args.device)
    return model, tokens[:, :-1], tokens[:, 1:]


def step(model, tokens, targets) -> None:
    loss, _ = model.loss(model(tokens), targets)
    loss.backward()
    model.zero_grad(set_to_none=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def child(args: argparse.Namespace, mode: str) -> None:
    """One step in this fresh process: its RSS before and its peak RSS (VmHWM: ru_maxrss would carry the parent's
    peak over fork and exec)."""
    model, tokens, targets = build(args, mode)
    step(model, tokens[:1, :8], targets[:1, :8])  # loads the code paths (checkpointing imports more of torch)
    before = rss_bytes()
    step(model, tokens, targets)
    print(json.dumps({"before": before, "peak": peak_rss_bytes()}))


def process_memory(args: argparse.Namespace, mode: str, argv: list[str]) -> float:
    """Peak minus starting memory of one step, in MiB: RSS in a child process (CPU) or the CUDA allocator."""
    if args.device == "cuda":
        model, tokens, targets = build(args, mode)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, tokens, targets)
        return (torch.cuda.max_memory_allocated() - start) / MIB
    # A fixed mmap threshold: glibc's default one rises as big blocks are freed, after which they stay in the heap
    # and the RSS shows the allocator's cache (measured: 270 MiB for `full`, whose live peak is 72 MiB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, *argv, "--child", mode]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return (result["peak"] - result["before"]) / MIB


def timed(args: argparse.Namespace) -> dict[str, float]:
    """Median forward + backward time per mode; the modes take turns step by step, so that a drift in the load of
    a shared machine hits them alike. One warm-up round."""
    built = {mode: build(args, mode) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats + 1):
        for mode, (model, tokens, targets) in built.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(model, tokens, targets)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(t[1:]) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = (args.dim, args.layers, args.heads, args.kv_heads, args.vocab, args.batch, args.seq, args.repeats)
    if min(sizes) < 1:
        parser.error("every size must be >= 1")
    if args.child:
        return child(args, args.child)
    argv = sys.argv[1:]

    from megatron_adamc.model import measure_activation_memory

    rows = {}
    for mode in MODES:
        model, tokens, targets = build(args, mode)
        exact = measure_activation_memory(model, tokens, targets)
        del model
        rows[mode] = {
            "kept": exact.after_forward / MIB,
            "peak": exact.peak / MIB,
            "process": process_memory(args, mode, argv),
        }
    for mode, seconds in timed(args).items():
        rows[mode]["time"] = seconds
    base = rows["none"]
    process = "peak RSS - RSS before (MiB)" if args.device == "cpu" else "CUDA max allocated - before (MiB)"
    print(
        f"\nd={args.dim}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}, "
        f"batch {args.batch} x {args.seq} tokens, {args.dtype} on {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(f"| mode | kept after forward (MiB) | ratio | peak fwd+bwd (MiB) | ratio | {process} | fwd+bwd (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        kept, peak, seconds = r["kept"] / base["kept"], r["peak"] / base["peak"], r["time"] / base["time"]
        print(
            f"| {mode} | {r['kept']:.1f} | {kept:.3f} | {r['peak']:.1f} | {peak:.3f} | {r['process']:.1f} "
            f"| {r['time']:.2f} | {seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
