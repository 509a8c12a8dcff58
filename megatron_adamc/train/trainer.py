"""The Llama pretraining loop on DeepSpeed: what ``megatron-adamc train`` runs.

Everything a user can get wrong is checked before the run directory is touched. The data position is one integer
(consumed samples) and the RNG states are saved per rank, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from megatron_adamc.train import checkpoint
from megatron_adamc.train.config import TrainConfig
from megatron_adamc.train.deepspeed_config import precision, zero_stage
from megatron_adamc.train.distributed import DistEnv, all_mean, init_distributed
from megatron_adamc.train.metrics import MetricsLogger
from megatron_adamc.train.preflight import model_config as preflight_model_config
from megatron_adamc.train.preflight import preflight
from megatron_adamc.train.schedule import lr_multiplier

# Dense bf16 peak FLOP/s per GPU, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def _prepare_data(config: TrainConfig, env: DistEnv, num_train: int, num_valid: int):
    from megatron_adamc.data import Tokenizer, build_gpt_datasets, prepare_default_data

    data = config.data
    if data.default_corpus:
        prepared = prepare_default_data(
            os.path.expanduser(data.cache_dir), data.vocab_size, data.max_bytes, progress=env.is_main
        )
        train, valid, tokenizer_path, split = (
            prepared.train_prefix,
            prepared.valid_prefix,
            prepared.tokenizer_model,
            None,
        )
    else:
        train, valid, tokenizer_path, split = data.train, data.valid, os.path.expanduser(data.tokenizer), data.split
        if valid is None and split is None:
            split = "98,2,0"
    tokenizer = Tokenizer(tokenizer_path, field="data.tokenizer")
    train_ds, valid_ds = build_gpt_datasets(
        train, valid, config.train.seq_len, config.seed, num_train, num_valid, tokenizer,
        cache_dir=data.index_cache_dir, split=split,
    )  # fmt: skip
    return tokenizer, train_ds, valid_ds


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "megatron-core", "sentencepiece", "megatron-adamc"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _mfu(flops_per_token: float, tokens_per_s: float, env: DistEnv) -> float | None:
    if env.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(env.device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else flops_per_token * tokens_per_s / (peak * env.world_size)


def _batch(dataset, indices: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron_adamc.data.sampler import collate

    batch = collate(dataset, indices)
    return batch["tokens"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"

    # Validation that needs no process group and writes nothing.
    def preflight(self, world_size: int) -> dict[str, Any]:
        return preflight(self.config, self.run_dir, world_size)

    def run(self) -> dict[str, Any]:
        import megatron_adamc.deepspeed as mad
        from megatron_adamc.model import Llama

        config, tc = self.config, self.config.train
        ds_config = self.preflight(int(os.environ.get("WORLD_SIZE", 1)))
        env = init_distributed()
        torch.manual_seed(config.seed)
        samples_per_step = tc.micro_batch_size * tc.grad_accum * env.world_size
        num_valid = config.eval.batches * tc.micro_batch_size * env.world_size
        tokenizer, train_ds, valid_ds = _prepare_data(config, env, tc.steps * samples_per_step, num_valid)
        model_config = preflight_model_config(config, tokenizer.vocab_size)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        model = Llama(model_config, seed=config.seed)
        groups = mad.decay_param_groups(model, exclude_embeddings=config.optimizer.exclude_embeddings_from_decay)
        sched = config.scheduler
        multiplier = lr_multiplier(
            sched.type, tc.steps, sched.warmup_steps, sched.min_lr / config.optimizer.lr, sched.decay_fraction
        )
        engine, *_ = mad.initialize(
            model=model, model_parameters=groups, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier),
        )  # fmt: skip

        client_state = checkpoint.load(engine, self.ckpt_dir)
        start_step = int(client_state["step"]) if client_state else 0
        consumed = int(client_state["consumed_samples"]) if client_state else 0
        if start_step >= tc.steps:
            if env.is_main:
                print(f"run already complete at step {start_step} (train.steps={tc.steps}); nothing to do")
            return {"step": start_step}

        tracker = None
        if config.tracking.enabled:
            from megatron_adamc.tracking.tracker import Tracker

            tracker = Tracker(engine, config.tracking, model)
        from megatron_adamc.train.preemption import PreemptionHandler

        preemption = PreemptionHandler().install()
        logger = MetricsLogger(self.run_dir, config, tc.steps, start_step, env.is_main)
        if env.is_main:
            self._write_run_info(env, ds_config, model, start_step)
            if client_state:
                logger.write(
                    f"resumed from {self.ckpt_dir}/{checkpoint.latest_tag(self.ckpt_dir)} at step {start_step}"
                )

        flops_per_token = model.flops_per_token(tc.seq_len)
        tokens_per_step = samples_per_step * tc.seq_len
        result: dict[str, Any] = {"step": start_step}
        train_loss = math.nan
        for step in range(start_step + 1, tc.steps + 1):
            t0 = time.perf_counter()
            if tracker is not None:
                tracker.begin_step(step)
            lr = float(engine.optimizer.param_groups[0]["lr"])
            engine.train()
            losses = []
            for _ in range(tc.grad_accum):
                tokens, labels = _batch(train_ds, self._indices(consumed, env), env.device)
                consumed += tc.micro_batch_size * env.world_size
                loss, _ = engine.module.loss(engine(tokens), labels)
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach().float())
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else math.nan
            (train_loss,) = all_mean([float(torch.stack(losses).mean())], env)
            elapsed = time.perf_counter() - t0
            record: dict[str, Any] = {
                "step": step, "tokens": step * tokens_per_step, "loss": train_loss, "lr": lr,
                "weight_decay": mad.applied_weight_decay(engine.optimizer.param_groups),
                "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / elapsed, "step_time_s": elapsed,
            }  # fmt: skip
            mfu = _mfu(flops_per_token, record["tokens_per_s"], env)
            if mfu is not None:
                record["mfu"] = mfu
            if tracker is not None:
                record.update(tracker.end_step(step, loss=train_loss, grad_norm=grad_norm))
                for event in tracker.pop_events():
                    logger.write(f"spike at step {step}: {json.dumps(event)}")
            if step % config.eval.interval == 0 or step == tc.steps:
                record["val_loss"] = self._evaluate(engine, valid_ds, env)
                result["val_loss"] = record["val_loss"]
            if step % config.logging.interval == 0 or "val_loss" in record or step == tc.steps:
                logger.log(record)
            logger.progress(step, train_loss, record["tokens_per_s"])
            result.update(step=step, loss=train_loss)
            stop = preemption.should_stop()
            pause = tc.stop_at_step is not None and step >= tc.stop_at_step
            if step % config.checkpoint.interval == 0 or step == tc.steps or stop or pause:
                checkpoint.save(
                    engine, self.ckpt_dir, step, {"step": step, "consumed_samples": consumed}, config.checkpoint.keep
                )
            if stop:
                logger.write(f"stopping at step {step} for preemption; checkpoint saved")
                if env.is_main:
                    preemption.requeue()
                result["preempted"] = True
                break
            if pause:
                logger.write(f"stopping at train.stop_at_step={step}; checkpoint saved, run again to continue")
                result["paused"] = True
                break
        logger.close()
        if tracker is not None:
            tracker.close()
        if env.is_main and not (result.get("preempted") or result.get("paused")):
            val = result.get("val_loss", math.nan)
            print(f"final train loss {train_loss:.4f} | validation loss {val:.4f} | metrics: {logger.path}")
        return result

    def _indices(self, consumed: int, env: DistEnv) -> list[int]:
        from megatron_adamc.data.sampler import batch_indices

        return batch_indices(consumed, self.config.train.micro_batch_size, env.rank, env.world_size)

    @torch.no_grad()
    def _evaluate(self, engine: Any, valid_ds: Any, env: DistEnv) -> float:
        if valid_ds is None:
            return math.nan
        from megatron_adamc.data.sampler import batch_indices

        engine.eval()
        mb = self.config.train.micro_batch_size
        losses = []
        for i in range(self.config.eval.batches):
            indices = batch_indices(i * mb * env.world_size, mb, env.rank, env.world_size, len(valid_ds))
            tokens, labels = _batch(valid_ds, indices, env.device)
            loss, parts = engine.module.loss(engine(tokens), labels)
            losses.append(float(parts["ce"]))
        engine.train()
        return all_mean([sum(losses) / len(losses)], env)[0]

    def _write_run_info(self, env: DistEnv, ds_config: dict, model: torch.nn.Module, start_step: int) -> None:
        info = {
            "config": self.config.model_dump(mode="json"),
            "deepspeed": ds_config,
            "world_size": env.world_size,
            "num_nodes": env.num_nodes,
            "device": str(env.device),
            "backend": env.backend,
            "zero_stage": zero_stage(ds_config),
            "precision": precision(ds_config),
            "num_params": sum(p.numel() for p in model.parameters()),
            "resumed_from_step": start_step,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "versions": _versions(),
            "git_commit": _git_commit(),
        }
        tmp = self.run_dir / "run.json.tmp"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.run_dir / "run.json")
