"""The Llama pretraining loop on DeepSpeed: what ``megatron-adamc train`` runs.

``Trainer.build`` validates everything a user can get wrong before touching the run directory, then builds each
component from its own config section: the checkpointer (``checkpoint.*``: when to save, crash-safe saves, verified
resume), the evaluator (``eval.*``), the metrics logger (``logging.*``), the divergence guard and the lr schedule
(``train.*``, ``scheduler.*``), the tracker (``tracking.*``). ``train()`` runs the loop and ``train_step()`` one
optimizer step. The data position is one integer (consumed samples) and the RNG states are saved per rank, so a
resumed run repeats an uninterrupted one exactly; on another world size it continues through a universal checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_adamc.data.loader import BatchLoader
from megatron_adamc.errors import DivergenceError, RunLockedError, UserError
from megatron_adamc.metrics_file import (
    DATA_WAIT_S,
    GRAD_NORM,
    LOSS,
    LR,
    MFU,
    PEAK_MEMORY_GB,
    SKIPPED_STEPS,
    STEP,
    STEP_TIME_S,
    TOKENS,
    TOKENS_PER_S,
    VAL_LOSS,
    WEIGHT_DECAY,
)  # fmt: skip
from megatron_adamc.train import universal
from megatron_adamc.train.build import (
    base_optimizer,
    build_data,
    build_engine,
    build_model,
    optimizer_state_is_finite,
    parallelize,
)  # fmt: skip
from megatron_adamc.train.checkpointer import Candidate, Checkpointer
from megatron_adamc.train.config import TrainConfig
from megatron_adamc.train.deepspeed_config import precision, zero_stage
from megatron_adamc.train.distributed import DistEnv, all_mean, init_distributed
from megatron_adamc.train.evaluator import Evaluator
from megatron_adamc.train.guard import DivergenceGuard, poison, weight_norm
from megatron_adamc.train.jit_locks import watch_for_stale_locks
from megatron_adamc.train.metrics import MetricsLogger
from megatron_adamc.train.preemption import PreemptionHandler
from megatron_adamc.train.preflight import preflight
from megatron_adamc.train.resume import (
    ResumePlan,
    check_same_tokenizer,
    plan_resume,
    run_identity,
    tokenizer_identity,
)  # fmt: skip
from megatron_adamc.train.run_dir import RunLock, append_run_info, git_commit, versions
from megatron_adamc.train.schedule import LRSchedule

# Dense bf16 peak FLOP/s per GPU, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def mfu(flops_per_token: float, tokens_per_s: float, env: DistEnv) -> float | None:
    if env.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(env.device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else flops_per_token * tokens_per_s / (peak * env.world_size)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    bad_reason: str | None
    data_wait_s: float
    record: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Build with ``Trainer.build(config, run_dir)``; ``train()`` returns a summary dict."""

    def __init__(self, **parts: Any) -> None:
        self.__dict__.update(parts)

    # ================================================================== build
    @classmethod
    def build(cls, config: TrainConfig, run_dir: Path) -> Trainer:
        ds_config = preflight(config, run_dir, int(os.environ.get("WORLD_SIZE", 1)))
        with watch_for_stale_locks():  # DeepSpeed JIT-loads its communication op here
            env = init_distributed()
        lock = _lock(run_dir, env)
        try:
            return cls._build_locked(config, run_dir, ds_config, env, lock)
        except BaseException:
            lock.release(undo=True)  # nothing was written yet: leave the run directory as it was
            raise

    @classmethod
    def _build_locked(cls, config: TrainConfig, run_dir: Path, ds_config: dict, env: DistEnv, lock: RunLock) -> Trainer:
        log = _printer(env)
        checkpointer = Checkpointer(config.checkpoint, run_dir, log)
        candidate = checkpointer.find_resume()
        tc = config.train
        global_batch = tc.micro_batch_size * tc.grad_accum * env.world_size
        dump = config.model_dump(mode="json")
        identity = run_identity(dump, global_batch, precision(ds_config), zero_stage(ds_config))
        plan = ResumePlan([], tc.grad_accum, False)
        if candidate is not None:
            saved = candidate.state
            plan = plan_resume(saved["identity"], identity, int(saved["world_size"]), env.world_size)
            if plan.grad_accum != tc.grad_accum:
                config = config.model_copy(deep=True)
                config.train.grad_accum = plan.grad_accum
                ds_config["gradient_accumulation_steps"] = plan.grad_accum
            identity["train.grad_accum"] = plan.grad_accum
            identity["global_batch"] = int(saved["global_batch"])
        if candidate is not None and candidate.step >= config.train.steps:
            return cls(config=config, run_dir=run_dir, env=env, lock=lock, log=log, done_at=candidate.step)

        global_batch = config.train.micro_batch_size * config.train.grad_accum * env.world_size
        num_valid = config.eval.batches * config.train.micro_batch_size * env.world_size
        data = build_data(config, env, config.train.steps * global_batch, num_valid)
        if candidate is not None:
            check_same_tokenizer(candidate.state, data.tokenizer, candidate.tag)  # swapped in place under the run
        torch.manual_seed(config.seed)
        model = build_model(config, data.tokenizer.vocab_size)
        if candidate is None and config.checkpoint.init_from:
            from megatron_adamc.model.weights import load_weights

            differences = load_weights(model, config.checkpoint.init_from)
            log(f"initialised the model from {config.checkpoint.init_from}")
            for name, (stored, ours) in differences.items():
                log(f"checkpoint.init_from: the weights were trained with model.{name}={stored}, this run uses {ours}")
        load_tag = None
        if plan.world_size_changed:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
            load_tag = universal.convert(checkpointer.dir, candidate.tag, log)
        parallelize(config, model)
        with watch_for_stale_locks():  # ... and its optimizer op here
            engine = build_engine(config, model, ds_config)

        trainer = cls(
            config=config, run_dir=run_dir, env=env, lock=lock, log=log, done_at=None, ds_config=ds_config,
            checkpointer=checkpointer, engine=engine, model=model, data=data, identity=identity,
            schedule=LRSchedule(config), guard=DivergenceGuard.from_config(config.train),
            evaluator=Evaluator(config.eval, config.train.micro_batch_size, data.valid, env),
            start_step=0, consumed=0, tracker=None, resumed_from=None, plan=plan,
        )  # fmt: skip
        if candidate is not None:
            trainer._restore(candidate, load_tag)
        if config.tracking.enabled:
            from megatron_adamc.tracking.tracker import Tracker

            trainer.tracker = Tracker(engine, config.tracking, model)
            if candidate is not None and candidate.state.get("tracker"):
                trainer.tracker.load_state_dict(candidate.state["tracker"])
        checkpointer.start_afresh()  # a fresh start sets aside incomplete saves and old rows (nothing to resume)
        trainer.logger = MetricsLogger(run_dir, config, config.train.steps, trainer.start_step, env.is_main)
        trainer.batches = BatchLoader(
            data.train, config.train.micro_batch_size, env.rank, env.world_size, trainer.consumed,
            config.data.num_workers, config.data.prefetch_factor, env.device,
        )  # fmt: skip
        return trainer

    def _restore(self, candidate: Candidate, load_tag: str | None) -> None:
        """Model, optimizer, data position, guard and RNG from ``candidate``; config changes applied and logged."""
        state = candidate.state
        same_world = not self.plan.world_size_changed
        # What each group is (decayed or not, its name), as built: DeepSpeed 0.19.8's ZeRO-3 universal load copies
        # group 0's hyperparameters into EVERY group, which would decay norm gains and biases from then on.
        built = [(g["weight_decay"] > 0, g.get("name")) for g in self.engine.optimizer.param_groups]
        self.checkpointer.load(self.engine, candidate, tag=load_tag, restore_rng=same_world)
        # ... and hands every sub-group's state the SAME ``step`` tensor, which torch's Adam increments in place: each
        # step would then count once per sub-group. One tensor each, as a fresh optimizer has.
        for opt_state in base_optimizer(self.engine).state.values():
            if isinstance(opt_state.get("step"), torch.Tensor):
                opt_state["step"] = opt_state["step"].clone()
        if not same_world:
            # Rank r of the new world has no saved stream: derive every rank's seeds from (seed, step, rank).
            seed = hash((self.config.seed, candidate.step, self.env.rank)) % 2**31
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        self.start_step, self.consumed = int(state["step"]), int(state["consumed_samples"])
        self.guard.load_state_dict(state.get("guard", {}))
        self.resumed_from = candidate.tag
        opt = self.config.optimizer
        # The checkpoint restored the old values: the config rules (a changed weight decay takes effect, logged).
        for group, (decayed, name) in zip(self.engine.optimizer.param_groups, built, strict=True):
            group["weight_decay"] = opt.weight_decay if decayed else 0.0
            group["betas"], group["eps"] = tuple(opt.betas), opt.eps
            if name is not None:
                group["name"] = name

    # ================================================================== train
    def train(self) -> dict[str, Any]:
        if self.done_at is not None:
            steps = self.config.train.steps
            self.log(f"run already complete at step {self.done_at} (train.steps={steps}); nothing to do")
            self.lock.release()
            return {"step": self.done_at}
        config, env, logger = self.config, self.env, self.logger
        tc = config.train
        self._write_run_info()
        if self.resumed_from is not None:
            changes = [f"{key} {old!r} -> {new!r}" for key, old, new in self.plan.changes]
            logger.event(
                "resume", self.start_step, f"resumed from {self.checkpointer.dir / self.resumed_from} at step "
                f"{self.start_step}" + (f"; config changes: {', '.join(changes)}" if changes else ""),
                checkpoint=self.resumed_from, world_size=env.world_size, changes=changes,
            )  # fmt: skip
            if self.plan.world_size_changed:
                self.log("world size changed: RNG streams reseeded from (seed, step, rank); data order unchanged")
        self.guard.observe_start(self.start_step, weight_norm(self.engine))  # the reference of the weights' norm
        preemption = PreemptionHandler().install()
        flops_per_token = self.model.flops_per_token(tc.seq_len)
        result: dict[str, Any] = {"step": self.start_step}
        step = self.start_step
        try:
            for step in range(self.start_step + 1, tc.steps + 1):
                last = step == tc.steps
                t0 = time.perf_counter()
                out = self.train_step(step)
                elapsed = time.perf_counter() - t0
                record = self._record(step, out, elapsed, flops_per_token)
                if self.evaluator.should_evaluate(step, last):
                    record[VAL_LOSS] = result["val_loss"] = self.evaluator.evaluate(self.engine)
                if logger.should_log(step, last) or VAL_LOSS in record:
                    logger.log(record)
                logger.progress(step, out.loss, record[TOKENS_PER_S])
                result.update(step=step, loss=out.loss)
                self._after_bad_step(step, out)
                stop = preemption.should_stop()
                pause = tc.stop_at_step is not None and step >= tc.stop_at_step
                saved = False
                if self.checkpointer.should_save(step, last) or stop or pause:
                    saved = self._save(step)
                if stop or pause:
                    why = "interrupted (Ctrl-C)" if preemption.interrupted else "preemption"
                    why = f"train.stop_at_step={step}" if pause and not stop else f"step {step} for {why}"
                    done = "checkpoint saved" if saved else f"no checkpoint of it (last good: {self._last_good()})"
                    logger.write(f"stopping at {why}; {done}, run again to continue")
                    if stop and env.is_main and not preemption.interrupted:
                        preemption.requeue()
                    result["preempted" if stop else "paused"] = True
                    break
        finally:
            preemption.restore()
            self.batches.close()
            logger.close()
            if self.tracker is not None:
                self.tracker.close()
            self.lock.release()
        if self.guard.consecutive_bad and not result.get("preempted"):  # stop_at_step on a bad step is no pause
            raise DivergenceError(
                f"the run ended on {self.guard.consecutive_bad} non-finite/skipped step(s) at step {step}; "
                f"last good checkpoint: {self._last_good()}"
            )
        if env.is_main and not (result.get("preempted") or result.get("paused")):
            val = result.get("val_loss", math.nan)
            print(f"final train loss {result.get('loss', math.nan):.4f} | validation loss {val:.4f} | "
                  f"metrics: {logger.path}", flush=True)  # fmt: skip
        return result

    def train_step(self, step: int) -> StepResult:
        """One optimizer step: ``grad_accum`` micro batches, the update (or its skip), the step's numbers."""
        engine, tc = self.engine, self.config.train
        lr = self.schedule.apply(engine.optimizer.param_groups, step)
        if self.tracker is not None:
            self.tracker.begin_step(step)
        engine.train()
        skipped_before = engine.skipped_steps
        losses: list[torch.Tensor] = []
        wait = 0.0
        reason = None
        for micro in range(tc.grad_accum):
            t0 = time.perf_counter()
            tokens, labels = next(self.batches)
            wait += time.perf_counter() - t0
            loss, _ = engine.module.loss(engine(tokens), labels)
            losses.append(loss.detach().float())
            if micro == tc.grad_accum - 1:
                # One all-reduce, before the last backward: every rank knows the step's loss and decides alike.
                (mean_loss,) = all_mean([float(torch.stack(losses).mean())], self.env)
                reason = self.guard.pre_update(mean_loss)
                if reason is not None:
                    loss = poison(loss)  # NaN gradients: DeepSpeed's overflow check drops this update everywhere
            engine.backward(loss)
            engine.step()
        skipped = engine.skipped_steps > skipped_before
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else math.nan
        reason = self.guard.post_update(mean_loss, reason, skipped)
        return StepResult(mean_loss, grad_norm, lr, reason, wait)

    # ================================================================== helpers
    def _record(self, step: int, out: StepResult, elapsed: float, flops_per_token: float) -> dict[str, Any]:
        import megatron_adamc.deepspeed as mad

        tc = self.config.train
        tokens_per_step = tc.micro_batch_size * tc.grad_accum * self.env.world_size * tc.seq_len
        record: dict[str, Any] = {
            STEP: step, TOKENS: self.batches.consumed_samples * tc.seq_len, LOSS: out.loss, LR: out.lr,
            WEIGHT_DECAY: mad.applied_weight_decay(self.engine.optimizer.param_groups), GRAD_NORM: out.grad_norm,
            TOKENS_PER_S: tokens_per_step / elapsed, STEP_TIME_S: elapsed, DATA_WAIT_S: out.data_wait_s,
            SKIPPED_STEPS: self.guard.skipped_total,
        }  # fmt: skip
        value = mfu(flops_per_token, record[TOKENS_PER_S], self.env)
        if value is not None:
            record[MFU] = value
        if self.env.device.type == "cuda":
            record[PEAK_MEMORY_GB] = torch.cuda.max_memory_allocated(self.env.device) / 1e9
            torch.cuda.reset_peak_memory_stats(self.env.device)
        if self.tracker is not None:
            finite_loss = out.loss if math.isfinite(out.loss) else None
            record.update(self.tracker.end_step(step, loss=finite_loss, grad_norm=out.grad_norm))
            for event in self.tracker.pop_events():
                self.logger.event("spike", step, **{k: v for k, v in event.items() if k not in ("event", "step")})
        return record

    def _after_bad_step(self, step: int, out: StepResult) -> None:
        if out.bad_reason is None:
            return
        self.logger.event(
            "skipped_step", step, f"step {step}: update skipped ({out.bad_reason}, loss {out.loss:.6g}, grad norm "
            f"{out.grad_norm:.6g}); {self.guard.consecutive_bad} bad step(s) in a row",
            reason=out.bad_reason, loss=out.loss, grad_norm=out.grad_norm,
        )  # fmt: skip
        if self.guard.diverged:
            raise DivergenceError(
                f"diverged: {self.guard.consecutive_bad} bad steps in a row up to step {step} (last: {out.bad_reason})"
                f"; last good checkpoint: {self._last_good()}. Lower optimizer.lr or raise train.max_bad_steps"
            )

    def _last_good(self) -> str:
        tag = self.checkpointer.last_saved or self.resumed_from or self.checkpointer.pointer()
        return str(self.checkpointer.dir / tag) if tag else "none (the run has not saved one yet)"

    def _save(self, step: int) -> bool:
        if self.guard.consecutive_bad:
            self.logger.write(f"step {step}: no checkpoint while steps are being skipped; the last good one stays")
            return False
        ok = torch.tensor([1 if optimizer_state_is_finite(self.engine) else 0], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            raise DivergenceError(
                f"step {step}: the optimizer state holds non-finite values, so no checkpoint was written; last good "
                f"checkpoint: {self._last_good()}"
            )
        norm = weight_norm(self.engine)
        unusable = self.guard.unusable_weights(step, norm)
        if unusable is not None:
            raise DivergenceError(
                f"step {step}: {unusable}, so no checkpoint was written; last good checkpoint: {self._last_good()}. "
                "Lower optimizer.lr and resume from it"
            )
        self.guard.weights_saved(step, norm)
        state = {
            "step": step, "consumed_samples": self.batches.consumed_samples, "world_size": self.env.world_size,
            "weight_norm": norm, "tokenizer": tokenizer_identity(self.data.tokenizer),
            "global_batch": self.identity["global_batch"], "identity": self.identity,
            "config": self.config.model_dump(mode="json"), "guard": self.guard.state_dict(),
            "tracker": self.tracker.state_dict() if self.tracker is not None else None,
        }  # fmt: skip
        self.checkpointer.save(self.engine, step, state)
        return True

    def _write_run_info(self) -> None:
        if not self.env.is_main:
            return
        env = self.env
        header = {
            "config": self.config.model_dump(mode="json"), "deepspeed": self.ds_config,
            "zero_stage": zero_stage(self.ds_config), "precision": precision(self.ds_config),
            "num_params": sum(p.numel() for p in self.model.parameters()),
        }  # fmt: skip
        invocation = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "world_size": env.world_size,
            "num_nodes": env.num_nodes, "device": str(env.device), "backend": env.backend,
            "resumed_from": self.resumed_from, "start_step": self.start_step,
            "changes": [[k, old, new] for k, old, new in self.plan.changes],
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "git_commit": git_commit(), "versions": versions(),
        }  # fmt: skip
        append_run_info(self.run_dir, header, invocation)


def train_from_config(config_path: str | Path, output_dir: str | Path, overrides: list[str]) -> int:
    """What ``megatron-adamc train`` does: load and validate the config with its overrides, build, train."""
    import logging

    from megatron_adamc.train.config import load_config

    config = load_config(str(config_path), overrides)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    Trainer.build(config, Path(output_dir)).train()
    return 0


def _printer(env: DistEnv):
    def log(message: str) -> None:
        if env.is_main:
            print(message, flush=True)

    return log


def _lock(run_dir: Path, env: DistEnv) -> RunLock:
    """Rank 0 takes the run directory's lock; every rank learns the outcome (and raises alike)."""
    lock = RunLock(run_dir)
    error, note = None, None
    if env.is_main:
        try:
            note = lock.acquire()
        except RunLockedError as err:
            error = str(err)
        except OSError as err:
            error = f"--output-dir {run_dir}: cannot write there ({err.strerror}); choose a writable path"
    box = [error, note]
    if env.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RunLockedError(box[0]) if "in use" in box[0] else UserError(box[0])
    if box[1] and env.is_main:
        print(box[1], flush=True)
    return lock
