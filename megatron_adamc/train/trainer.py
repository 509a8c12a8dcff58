"""The Llama pretraining loop on DeepSpeed: what ``megatron-adamc train`` runs.

``Trainer.build`` validates everything a user can get wrong before touching the run directory (``preflight``), takes
the run directory's lock, finds the checkpoint to resume from, then builds each component from its own config section:
the checkpointer (``checkpoint.*``), the evaluator (``eval.*``), the metrics logger (``logging.*``), the divergence
guard and the lr schedule (``train.*``, ``scheduler.*``), the norm tracker (``tracking.*``). A run that is already
complete is answered before anything is built. ``train()`` runs the loop, ``train_step()`` one optimizer step; the
components hook into the loop through one interface (``component.Component``). What a resume needs beside DeepSpeed's
checkpoint is one typed record (``state.TrainerState``): the data position is one integer (consumed samples) and
the RNG states are saved per rank, so a resumed run repeats an uninterrupted one exactly; on another world size it
continues through a universal checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_adamc.config.deepspeed_json import precision, zero_stage
from megatron_adamc.config.train import TrainConfig
from megatron_adamc.data.loader import BatchLoader
from megatron_adamc.errors import DivergenceError, MegatronAdamCError, UserError
from megatron_adamc.metrics_file import (
    DATA_WAIT_S,
    GRAD_NORM,
    LOSS,
    LR,
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
    build_data,
    build_engine,
    build_model,
    optimizer_state_is_finite,
    parallelize,
)  # fmt: skip
from megatron_adamc.train.checkpointer import Candidate, Checkpointer
from megatron_adamc.train.component import Component
from megatron_adamc.train.distributed import DistEnv, all_mean, close_distributed, init_distributed
from megatron_adamc.train.evaluator import Evaluator
from megatron_adamc.train.guard import DivergenceGuard, poison, weight_norm
from megatron_adamc.train.jit_locks import watch_for_stale_locks
from megatron_adamc.train.metrics import DeviceStats, MetricsLogger
from megatron_adamc.train.preemption import PreemptionHandler
from megatron_adamc.train.preflight import preflight
from megatron_adamc.train.resume import ResumePlan, check_same_tokenizer, plan_resume, run_identity, tokenizer_identity
from megatron_adamc.train.run_dir import RunLock, append_run_info, invocation_info, run_header
from megatron_adamc.train.schedule import LRSchedule
from megatron_adamc.train.state import TrainerState

Log = Callable[[str], None]


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    bad_reason: str | None
    data_wait_s: float


@dataclass
class CompletedRun:
    """What ``build`` returns for a run directory whose newest checkpoint is at or past ``train.steps``."""

    step: int
    steps: int
    lock: RunLock
    log: Log

    def train(self) -> dict[str, Any]:
        self.log(f"run already complete at step {self.step} (train.steps={self.steps}); nothing to do")
        self.lock.release()
        return {"step": self.step}


@dataclass(eq=False)
class Trainer:
    """Build with ``Trainer.build(config, run_dir)``; ``train()`` returns a summary dict."""

    config: TrainConfig
    run_dir: Path
    env: DistEnv
    lock: RunLock
    log: Log
    ds_config: dict[str, Any]
    engine: Any
    model: torch.nn.Module
    data: Any
    batches: BatchLoader
    schedule: LRSchedule
    guard: DivergenceGuard
    checkpointer: Checkpointer
    logger: MetricsLogger
    components: list[Component]  # called in this order at every step; the logger last (it writes the row)
    tracking: Component | None  # the norm tracker's hook among them (its state goes into TrainerState.tracker)
    identity: dict[str, Any]
    plan: ResumePlan
    start_step: int = 0
    resumed_from: str | None = None

    # ================================================================== build
    @classmethod
    def build(cls, config: TrainConfig, run_dir: Path) -> Trainer | CompletedRun:
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
    def _build_locked(
        cls, config: TrainConfig, run_dir: Path, ds_config: dict, env: DistEnv, lock: RunLock
    ) -> Trainer | CompletedRun:
        log = _printer(env)
        checkpointer = Checkpointer(config.checkpoint, run_dir, log)
        candidate = checkpointer.find_resume()
        tc = config.train
        identity = run_identity(
            config.model_dump(mode="json"), tc.micro_batch_size * tc.grad_accum * env.world_size,
            precision(ds_config), zero_stage(ds_config),
        )  # fmt: skip
        plan = ResumePlan([], tc.grad_accum, False)
        if candidate is not None:
            saved = candidate.state
            plan = plan_resume(saved.identity, identity, saved.world_size, env.world_size)
            if plan.grad_accum != tc.grad_accum:
                config = config.model_copy(deep=True)
                config.train.grad_accum = plan.grad_accum
                ds_config["gradient_accumulation_steps"] = plan.grad_accum
            identity["train.grad_accum"] = plan.grad_accum
            identity["global_batch"] = saved.global_batch
            if candidate.step >= config.train.steps:
                return CompletedRun(candidate.step, config.train.steps, lock, log)

        tc = config.train
        global_batch = tc.micro_batch_size * tc.grad_accum * env.world_size
        num_valid = config.eval.batches * tc.micro_batch_size * env.world_size
        data = build_data(config, env, tc.steps * global_batch, num_valid)
        if candidate is not None:  # the tokenizer swapped in place under the run
            check_same_tokenizer(candidate.state.tokenizer, data.tokenizer, candidate.tag)
        torch.manual_seed(config.seed)
        model = build_model(config, data.tokenizer.vocab_size)
        if candidate is None and config.checkpoint.init_from:
            _init_from(model, config.checkpoint.init_from, log)
        load_tag = None
        if plan.world_size_changed:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
            load_tag = universal.convert(checkpointer.dir, candidate.tag, log)
        parallelize(config, model)
        with watch_for_stale_locks():  # ... and its optimizer op here
            engine = build_engine(config, model, ds_config)

        guard = DivergenceGuard.from_config(tc)
        state = TrainerState()
        if candidate is not None:
            state = candidate.state
            _restore(engine, checkpointer, candidate, load_tag, config, plan, env)
            guard.load_state_dict(state.guard)
        components: list[Component] = [DeviceStats(model.flops_per_token(tc.seq_len), env)]
        checkpointer.start_afresh()  # a fresh start sets aside incomplete saves and old rows (nothing to resume)
        logger = MetricsLogger(run_dir, config, tc.steps, state.step, env.is_main)
        tracking = None
        if config.tracking.enabled:
            from megatron_adamc.train.tracking_hook import TrackingHook

            tracking = TrackingHook(engine, config.tracking, model, logger)
            if state.tracker:
                tracking.load_state_dict(state.tracker)
            components.append(tracking)
        components += [Evaluator(config.eval, tc.micro_batch_size, data.valid, env, engine), logger]
        batches = BatchLoader(
            data.train, tc.micro_batch_size, env.rank, env.world_size, state.consumed_samples,
            config.data.num_workers, config.data.prefetch_factor, env.device,
        )  # fmt: skip
        return cls(
            config=config, run_dir=run_dir, env=env, lock=lock, log=log, ds_config=ds_config, engine=engine,
            model=model, data=data, batches=batches, schedule=LRSchedule(config), guard=guard,
            checkpointer=checkpointer, logger=logger, components=components, tracking=tracking, identity=identity,
            plan=plan,
            start_step=state.step, resumed_from=candidate.tag if candidate is not None else None,
        )  # fmt: skip

    # ================================================================== train
    def train(self) -> dict[str, Any]:
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
        result: dict[str, Any] = {"step": self.start_step}
        step = self.start_step
        try:
            for step in range(self.start_step + 1, tc.steps + 1):
                last = step == tc.steps
                t0 = time.perf_counter()
                for component in self.components:
                    component.begin_step(step, last)
                out = self.train_step(step)
                record = self._record(step, out, time.perf_counter() - t0)
                for component in self.components:
                    component.end_step(step, last, record)
                result.update(step=step, loss=out.loss)
                if VAL_LOSS in record:
                    result["val_loss"] = record[VAL_LOSS]
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
            for component in self.components:
                component.close()
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
    def _record(self, step: int, out: StepResult, elapsed: float) -> dict[str, Any]:
        """The step's metrics row, before the components add theirs."""
        import megatron_adamc.deepspeed as mad

        return {
            STEP: step, TOKENS: self.batches.consumed_samples * self.config.train.seq_len, LOSS: out.loss,
            LR: out.lr, WEIGHT_DECAY: mad.applied_weight_decay(self.engine.optimizer.param_groups),
            GRAD_NORM: out.grad_norm, TOKENS_PER_S: tokens_per_step(self.config, self.env) / elapsed,
            STEP_TIME_S: elapsed, DATA_WAIT_S: out.data_wait_s, SKIPPED_STEPS: self.guard.skipped_total,
        }  # fmt: skip

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
        """Write a checkpoint of ``step``; False when the step is being skipped (the last good one stays)."""
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
        state = TrainerState(
            step=step, consumed_samples=self.batches.consumed_samples, world_size=self.env.world_size,
            global_batch=self.identity["global_batch"], identity=self.identity,
            config=self.config.model_dump(mode="json"), guard=self.guard.state_dict(),
            tracker=self.tracking.state_dict() if self.tracking is not None else None,
            weight_norm=norm, tokenizer=tokenizer_identity(self.data.tokenizer),
        )  # fmt: skip
        self.checkpointer.save(self.engine, step, state.state_dict())
        return True

    def _write_run_info(self) -> None:
        if self.env.is_main:
            header = run_header(self.config, self.ds_config, sum(p.numel() for p in self.model.parameters()))
            invocation = invocation_info(self.env, self.resumed_from, self.start_step, self.plan.changes)
            append_run_info(self.run_dir, header, invocation)


def tokens_per_step(config: TrainConfig, env: DistEnv) -> int:
    tc = config.train
    return tc.micro_batch_size * tc.grad_accum * env.world_size * tc.seq_len


def _init_from(model: torch.nn.Module, path: str, log: Log) -> None:
    from megatron_adamc.model.weights import load_weights

    differences = load_weights(model, path)
    log(f"initialised the model from {path}")
    for name, (stored, ours) in differences.items():
        log(f"checkpoint.init_from: the weights were trained with model.{name}={stored}, this run uses {ours}")


def _restore(
    engine: Any, checkpointer: Checkpointer, candidate: Candidate, load_tag: str | None, config: TrainConfig,
    plan: ResumePlan, env: DistEnv,
) -> None:  # fmt: skip
    """Model, optimizer and RNG from ``candidate``; the config's optimizer settings then rule (changes are logged)."""
    same_world = not plan.world_size_changed
    built = universal.groups_as_built(engine)
    checkpointer.load(engine, candidate, tag=load_tag, restore_rng=same_world)
    universal.repair_after_load(engine)
    if not same_world:
        # Rank r of the new world has no saved stream: derive every rank's seeds from (seed, step, rank).
        seed = hash((config.seed, candidate.step, env.rank)) % 2**31
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    opt = config.optimizer
    # The checkpoint restored the old values (and a ZeRO-3 universal load group 0's in every group): the config rules.
    for group, (decayed, name) in zip(engine.optimizer.param_groups, built, strict=True):
        group["weight_decay"] = opt.weight_decay if decayed else 0.0
        group["betas"], group["eps"] = tuple(opt.betas), opt.eps
        if name is not None:
            group["name"] = name


def train_from_config(config_path: str | Path, output_dir: str | Path, overrides: list[str]) -> int:
    """What ``megatron-adamc train`` does: load and validate the config with its overrides, build, train."""
    import logging

    from megatron_adamc.config.train import load_config

    config = load_config(str(config_path), overrides)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        Trainer.build(config, Path(output_dir)).train()
    finally:
        close_distributed()
    return 0


def _printer(env: DistEnv) -> Log:
    def log(message: str) -> None:
        if env.is_main:
            print(message, flush=True)

    return log


def _lock(run_dir: Path, env: DistEnv) -> RunLock:
    """Rank 0 takes the run directory's lock; every rank learns the outcome and raises the same error."""
    lock = RunLock(run_dir)
    error: MegatronAdamCError | None = None
    note = None
    if env.is_main:
        try:
            note = lock.acquire()
        except MegatronAdamCError as err:
            error = err
        except OSError as err:
            error = UserError(f"--output-dir {run_dir}: cannot write there ({err.strerror}); choose a writable path")
    box = [error, note]
    if env.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    if box[1] and env.is_main:
        print(box[1], flush=True)
    return lock
