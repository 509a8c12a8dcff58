"""One optimizer step of AdamC vs AdamW on the same kernel, side by side in one run.

AdamC adds two per-group dict writes around the kernel (torch step hooks), so the ratio should be ~1.00 at any size.
Steps are interleaved (AdamW, AdamC, AdamW, ...) so that drift in machine load hits both alike; the table gives
medians. Usage: python benchmarks/optimizer_step.py [--sizes 1e6 1e7 1e8] [--repeats 30] [--cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from megatron_adamc.core.adamc import attach_adamc

TENSORS = 8  # a size's parameters are split over this many tensors, like a few layers


def kernels(cuda: bool) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    kw = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    if cuda:
        return {"FusedAdam (CUDA)": lambda p: FusedAdam(p, adam_w_mode=True, **kw)}
    return {
        "FusedAdam (DeepSpeed CPU build)": lambda p: FusedAdam(p, adam_w_mode=True, **kw),
        "DeepSpeedCPUAdam (ZeRO-Offload)": lambda p: DeepSpeedCPUAdam(p, adamw_mode=True, **kw),
        "torch AdamW fused": lambda p: torch.optim.AdamW(p, fused=True, **kw),
        "torch AdamW foreach": lambda p: torch.optim.AdamW(p, foreach=True, **kw),
    }


def make_params(numel: int, device: str) -> list[torch.Tensor]:
    params = []
    for _ in range(TENSORS):
        p = torch.nn.Parameter(torch.randn(numel // TENSORS, device=device) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        params.append(p)
    return params


def time_step(opt: torch.optim.Optimizer, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(make: Callable, numel: int, repeats: int, device: str) -> tuple[float, float]:
    plain = make(make_params(numel, device))
    corrected = make(make_params(numel, device))
    attach_adamc(corrected, lr_max=1e-3)
    for opt in (plain, corrected):  # warm-up: state allocation, kernel JIT
        for _ in range(3):
            time_step(opt, device)
    a, b = [], []
    for _ in range(repeats):
        a.append(time_step(plain, device))
        b.append(time_step(corrected, device))
    return statistics.median(a), statistics.median(b)


def hook_cost_us(repeats: int = 2000) -> float:
    """AdamC's fixed cost per step (its two step hooks), on a 1-element tensor whose kernel costs next to nothing."""
    plain, corrected = (torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3) for _ in range(2))
    attach_adamc(corrected, lr_max=1e-3)
    for opt in (plain, corrected):
        opt.param_groups[0]["params"][0].grad = torch.ones(1)
    a, b = [], []
    for _ in range(repeats):
        a.append(time_step(plain, "cpu"))
        b.append(time_step(corrected, "cpu"))
    return (statistics.median(b) - statistics.median(a)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cuda", action="store_true", help="the CUDA FusedAdam row (on a GPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadiest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if args.cuda else "cpu"
    print("| kernel | params | AdamW step (ms) | AdamC step (ms) | AdamC/AdamW |\n|---|---|---|---|---|")
    for name, make in kernels(args.cuda).items():
        for size in args.sizes:
            repeats = int(args.repeats * (1e7 / size) ** 0.5) if size < 1e7 else args.repeats
            t_w, t_c = bench(make, int(size), repeats, device)
            print(f"| {name} | {size / 1e6:g}M | {t_w * 1e3:.3f} | {t_c * 1e3:.3f} | {t_c / t_w:.3f} |", flush=True)
    print(f"\nAdamC's fixed cost per optimizer step (its two step hooks): {hook_cost_us():.1f} us")


if __name__ == "__main__":
    main()
