"""Time a training step spends waiting for its micro batch: synchronous collate vs the background BatchLoader.

Usage: ``python benchmarks/loader.py [--steps 60] [--step-ms 50] [--micro-batch 8 --seq 2048] [--item-ms 2]``

The step's compute is a fixed ``--step-ms`` sleep: on a GPU the step's work runs on the device while the host
thread waits, which is what a sleep does to the CPU (it leaves the cores to the loader's workers). Waiting is the
time ``next(loader)`` takes (the batch on the device, CPU here). Two datasets, each with every loader:

- ``gpt``: megatron-core's GPTDataset over the default corpus (the shared small one of the tests, built once):
  the real batch assembly of a run, memory-mapped token reads.
- ``slow``: the same items, each costing ``--item-ms`` of CPU work more (a blend of many sources, a tokenizer in
  the loop, a cold page cache or network storage), so assembly is visible next to the step.

Loaders: ``sync`` (num_workers=0: ``collate`` on the training thread, the trainer's path before BatchLoader) and
BatchLoader with 1 and 2 workers (prefetch 4). The first ``--warmup`` steps (worker start-up) are dropped; the
table gives median and mean wait per step, the mean step time and its ratio to ``sync``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


class SlowItems:
    """A dataset whose items cost ``item_ms`` of CPU work on top of the wrapped dataset's own."""

    def __init__(self, dataset, item_ms: float) -> None:
        self.dataset, self.item_s = dataset, item_ms / 1000

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        end = time.perf_counter() + self.item_s
        while time.perf_counter() < end:
            pass
        return self.dataset[i]


def measure(dataset, args: argparse.Namespace, num_workers: int) -> dict[str, float]:
    from megatron_adamc.data import BatchLoader

    waits, steps = [], []
    with BatchLoader(dataset, args.micro_batch, 0, 1, 0, num_workers=num_workers, prefetch_factor=4) as loader:
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            tokens, labels = next(loader)
            got = time.perf_counter()
            time.sleep(args.step_ms / 1000)  # the step's device work
            if step >= args.warmup:
                waits.append(got - start)
                steps.append(time.perf_counter() - start)
    return {
        "wait_median_ms": 1000 * statistics.median(waits),
        "wait_mean_ms": 1000 * statistics.fmean(waits),
        "step_ms": 1000 * statistics.fmean(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--step-ms", type=float, default=50.0)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--item-ms", type=float, default=2.0)
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "megatron-adamc-test-corpus"))
    args = parser.parse_args()
    if min(args.steps, args.micro_batch, args.seq) < 1 or args.warmup < 0 or min(args.step_ms, args.item_ms) < 0:
        parser.error("--steps, --micro-batch and --seq must be >= 1; --warmup, --step-ms, --item-ms >= 0")

    from megatron_adamc.data import build_gpt_datasets, prepare_default_data

    data = prepare_default_data(args.data_dir, vocab_size=512, max_bytes=400_000, progress=False)
    samples = (args.warmup + args.steps) * args.micro_batch + 4 * 2 * args.micro_batch  # and what is prefetched
    with tempfile.TemporaryDirectory() as cache:
        gpt, _ = build_gpt_datasets(data.train_prefix, None, args.seq, 1, samples, None, data.tokenizer_model, cache)
        datasets = {"gpt": gpt, f"slow (+{args.item_ms:g} ms/item)": SlowItems(gpt, args.item_ms)}
        rows = []
        for name, dataset in datasets.items():
            sync = None
            for label, workers in (("sync (collate on the step's thread)", 0), ("BatchLoader, 1 worker", 1),
                                   ("BatchLoader, 2 workers", 2)):  # fmt: skip
                result = measure(dataset, args, workers)
                sync = sync or result
                rows.append((name, label, result, result["step_ms"] / sync["step_ms"]))
    print(
        f"\nmicro batch {args.micro_batch} x {args.seq} tokens, step compute {args.step_ms:g} ms (sleep), "
        f"{args.steps} steps after {args.warmup}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| dataset | loader | wait per step, median (ms) | wait, mean (ms) | step (ms) | step / sync |")
    print("|---|---|---|---|---|---|")
    for name, label, r, ratio in rows:
        print(
            f"| {name} | {label} | {r['wait_median_ms']:.3f} | {r['wait_mean_ms']:.3f} | {r['step_ms']:.1f} "
            f"| {ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
