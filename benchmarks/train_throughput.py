"""Tokens/s of the trainer (DeepSpeed engine, AdamC) against a bare PyTorch loop, side by side in one run.

The trainer row is the real code path of ``megatron-adamc train``: ``Trainer.build(config, run_dir).train()`` with
tracking, TensorBoard, W&B and the progress bar off, read back from its metrics.jsonl (``step_time_s``, the span the
trainer times for ``tokens_per_s``). A second trainer row ("wall") times the whole loop iteration, log call to log
call, so per-step work outside the timed span (logging, preemption check) is not hidden. The bare loop uses the same
model config, seed, batches (same dataset, same sampler) and AdamW hyperparameters, decay groups, lr schedule and
grad clipping, with ``torch.optim.AdamW`` and no DeepSpeed; under a bf16 DeepSpeed JSON it runs in
``torch.autocast``.

Blocks alternate (trainer, bare, bare, trainer, ...) so that drift in machine load hits both alike; the first
``--warmup`` steps of every block are dropped. tokens/s = measured tokens / measured seconds over all blocks.

Usage: python benchmarks/train_throughput.py [--config configs/train/llama_tiny.yaml] [--steps 20] [--warmup 3]
           [--blocks 2] [--threads 1] [--set key=value ...]
On one GPU, the 1B preset in bf16:
       python benchmarks/train_throughput.py --set model.preset=1B \
           --set train.deepspeed=configs/deepspeed/zero1_bf16.json --set train.micro_batch_size=4 \
           --set train.seq_len=2048
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

TARGET = 0.95
REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_block(config_path: str, overrides: list[str], steps: int, warmup: int, out: Path) -> dict[str, list[float]]:
    """One ``Trainer.train()`` of ``warmup + steps`` steps; the measured steps' in-trainer and wall times."""
    from megatron_adamc.config.train import load_config
    from megatron_adamc.metrics_file import MetricsFile
    from megatron_adamc.train.metrics import MetricsLogger
    from megatron_adamc.train.trainer import Trainer

    total = warmup + steps
    base = load_config(config_path, overrides)
    config = load_config(
        config_path,
        overrides
        + [
            f"train.steps={max(base.train.steps, total + 1)}",  # the lr schedule stays the config's when it fits
            f"train.stop_at_step={total}",  # ends the block (with a checkpoint, outside the timed span)
            "logging.interval=1",
            f"eval.interval={10**9}",
            f"checkpoint.interval={10**9}",
            "tracking.enabled=false",
            "logging.tensorboard=false",
            "logging.wandb=false",
            "logging.progress=false",
        ],
    )
    run_dir = Path(tempfile.mkdtemp(prefix="trainer-", dir=out))
    stamps: list[float] = []
    original = MetricsLogger.log

    def log(self, record):  # noqa: ANN001 - a timestamp per logged step, then the trainer's own logging
        original(self, record)
        stamps.append(time.perf_counter())

    MetricsLogger.log = log
    try:
        Trainer.build(config, run_dir).train()
    finally:
        MetricsLogger.log = original
    records = MetricsFile(run_dir).read(strict=True).rows
    assert [r["step"] for r in records] == list(range(1, total + 1)), "the trainer logged other steps than asked"
    return {
        "timed": [r["step_time_s"] for r in records[warmup:]],
        "wall": [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)],
        "loss": [r["loss"] for r in records],
    }


class BareLoop:
    """The trainer's step with torch only: same model, batches, AdamW hyperparameters, schedule and clipping."""

    def __init__(self, config_path: str, overrides: list[str]) -> None:
        from megatron_adamc.config.deepspeed_json import build_deepspeed_config, precision
        from megatron_adamc.config.train import load_config
        from megatron_adamc.train.build import build_data
        from megatron_adamc.train.distributed import init_distributed

        self.config = load_config(config_path, overrides)
        self.env = init_distributed()
        tc = self.config.train
        self.samples_per_step = tc.micro_batch_size * tc.grad_accum * self.env.world_size
        data = build_data(
            self.config, self.env, tc.steps * self.samples_per_step, self.config.eval.batches * tc.micro_batch_size
        )
        self.train_ds, self.vocab_size = data.train, data.tokenizer.vocab_size
        self.precision = precision(build_deepspeed_config(self.config, self.env.world_size))
        if self.precision == "fp16":
            raise SystemExit("the bare loop does bf16 (autocast) or fp32; fp16 needs a loss scaler it does not have")

    def run(self, steps: int, warmup: int) -> dict[str, list[float]]:
        import megatron_adamc.deepspeed as mad
        from megatron_adamc.data.loader import BatchLoader
        from megatron_adamc.train.build import build_model, parallelize
        from megatron_adamc.train.schedule import LRSchedule

        config, tc, env = self.config, self.config.train, self.env
        total = warmup + steps
        torch.manual_seed(config.seed)
        model = build_model(config, self.vocab_size).to(env.device)
        parallelize(config, model)
        groups = mad.decay_param_groups(model, exclude_embeddings=config.optimizer.exclude_embeddings_from_decay)
        opt = config.optimizer
        kw = {"lr": opt.lr, "betas": tuple(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
        optimizer = torch.optim.AdamW(groups, **kw)
        schedule = LRSchedule(
            config.model_copy(update={"train": tc.model_copy(update={"steps": max(tc.steps, total + 1)})})
        )
        data = config.data
        batches = BatchLoader(
            self.train_ds, tc.micro_batch_size, env.rank, env.world_size, 0, data.num_workers, data.prefetch_factor,
            env.device,
        )  # fmt: skip
        autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()
        model.train()
        times, losses = [], []
        for step in range(1, total + 1):
            _sync(env.device)
            t0 = time.perf_counter()
            schedule.apply(optimizer.param_groups, step)
            micro = []
            for _ in range(tc.grad_accum):
                tokens, labels = next(batches)
                with autocast:
                    loss, _ = model.loss(model(tokens), labels)
                (loss / tc.grad_accum).backward()
                micro.append(loss.detach().float())
            if tc.grad_clip > 0:
                float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))  # the trainer reads it too
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(torch.stack(micro).mean()))
            times.append(time.perf_counter() - t0)
        batches.close()
        self.flops_per_token = model.flops_per_token(tc.seq_len)
        return {"timed": times[warmup:], "loss": losses}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/train/llama_tiny.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="measured steps per block (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of every block (default 3)")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per loop; order T B, B T, ... (default 2)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads for both loops (default 1: steady on a shared machine; 0: torch's default)",
    )  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="where the trainer's run dirs go (default: a tmp dir)")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.blocks < 1:
        parser.error("--steps, --warmup and --blocks must be >= 1 (the wall timing needs a step before the first)")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from megatron_adamc.config.deepspeed_json import build_deepspeed_config, precision, zero_stage
    from megatron_adamc.train.trainer import mfu as model_flops_utilization

    out = args.out or Path(tempfile.mkdtemp(prefix="train_throughput-"))
    out.mkdir(parents=True, exist_ok=True)
    bare = BareLoop(args.config, args.overrides)
    env, config = bare.env, bare.config
    tc = config.train
    tokens_per_step = bare.samples_per_step * tc.seq_len
    ds = build_deepspeed_config(config, env.world_size)

    timed: dict[str, list[float]] = {"trainer": [], "wall": [], "bare": []}
    first_losses: dict[str, list[float]] = {}
    for block in range(args.blocks):
        order = ("trainer", "bare") if block % 2 == 0 else ("bare", "trainer")
        for loop in order:
            start = time.perf_counter()
            if loop == "trainer":
                res = trainer_block(args.config, args.overrides, args.steps, args.warmup, out)
                timed["wall"] += res["wall"]
            else:
                res = bare.run(args.steps, args.warmup)
            timed[loop] += res["timed"]
            first_losses.setdefault(loop, res["loss"][:3])
            print(
                f"block {block} {loop:7s}: {tokens_per_step * len(res['timed']) / sum(res['timed']):,.0f} tokens/s "
                f"(median step {statistics.median(res['timed']) * 1e3:.1f} ms, block {time.perf_counter() - start:.0f}"
                f" s, load avg {os.getloadavg()[0]:.2f})",
                flush=True,
            )
            _release(env.device)

    flops_per_token = bare.flops_per_token
    rate = {k: tokens_per_step * len(v) / sum(v) for k, v in timed.items()}
    cuda = env.device.type == "cuda"
    device = torch.cuda.get_device_name(env.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n{device}; model {config.model.preset} ({tc.micro_batch_size} x {tc.seq_len} tokens x grad_accum "
        f"{tc.grad_accum}); ZeRO-{zero_stage(ds)} {precision(ds)} {config.optimizer.type}; {args.blocks} blocks x "
        f"{args.steps} steps per loop after {args.warmup} warm-up steps each; load avg {os.getloadavg()}"
    )
    print(f"first losses: trainer {first_losses['trainer']}, bare {first_losses['bare']}\n")
    rows = [
        (f"bare PyTorch (torch AdamW{', autocast bf16' if precision(ds) == 'bf16' else ''})", rate["bare"]),
        (f"trainer (DeepSpeed ZeRO-{zero_stage(ds)}, {config.optimizer.type}), as logged", rate["trainer"]),
        ("trainer, wall clock log to log", rate["wall"]),
    ]
    header = "| loop | tokens/s | ratio |" + (" MFU |" if cuda else "")
    print(header + "\n|---|---|---|" + ("---|" if cuda else ""))
    for name, value in rows:
        line = f"| {name} | {value:,.0f} | {value / rate['bare']:.3f} |"
        if cuda:
            mfu = model_flops_utilization(flops_per_token, value, env)
            line += f" {mfu * 100:.1f}% |" if mfu is not None else " n/a |"
        print(line)
    ratio = rate["trainer"] / rate["bare"]
    print(f"\ntarget ratio >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'} ({ratio:.3f})")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)  # the trainer's run dirs (metrics, checkpoints)


if __name__ == "__main__":
    main()
