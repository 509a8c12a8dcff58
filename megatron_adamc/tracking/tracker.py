"""The tracker the trainer drives: ``begin_step`` before the forward, ``end_step`` after ``engine.step()``.

On a tracked step every rank sums over its own partition (inside the optimizer step, see ``master.py``) and its
own micro-batches (forward hooks), then ONE all-reduce (SUM) of a single float64 vector turns those sums into the
full-tensor norms of every parameter at once, instead of a full gather and a collective per parameter as
``safe_get_full_*`` do. The maxima (attention logits, FP8 amax) need a MAX: they go in a second, tiny all-reduce,
only when activations or low precision are tracked.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from megatron_adamc.core import fp8
from megatron_adamc.core.adamc import ENABLED_KEY, LR_MAX_KEY
from megatron_adamc.core.fp8 import AmaxHistory
from megatron_adamc.core.norms import norm, parameter_metrics, predicted_forms, ratio, rms
from megatron_adamc.tracking import master as columns
from megatron_adamc.tracking.activations import ActivationStats
from megatron_adamc.tracking.config import TrackingConfig
from megatron_adamc.tracking.layout import build_layout
from megatron_adamc.tracking.master import MasterStats
from megatron_adamc.tracking.spike import SpikeAlarm
from megatron_adamc.tracking.transformer_engine import te_amax_metrics

FP8_STATS = ("overflow_frac", "underflow_frac", "rel_error")


class Tracker:
    """Per-parameter norms of the FP32 master partition, activations, low-precision headroom and spikes.

    Build it after ``deepspeed.initialize``; every rank must call ``begin_step``/``end_step`` (collective).
    """

    def __init__(self, engine: Any, config: TrackingConfig, model: nn.Module | None = None) -> None:
        from deepspeed import comm as dist
        from deepspeed.accelerator import get_accelerator

        self.engine = engine
        self.config = config
        self.model = model if model is not None else engine.module
        self.dist = dist
        self.device = torch.device(get_accelerator().current_device_name())
        self.layout = build_layout(engine, self.model)
        self.names = self.layout.names
        basic = getattr(engine, "basic_optimizer", None) or engine.optimizer
        optimizers = [basic]
        backup = getattr(engine.optimizer, "backup_optimizer", None)  # ZeRO-3 partial offload's second kernel
        if isinstance(backup, torch.optim.Optimizer) and backup is not basic:
            optimizers.append(backup)
        self.param_groups = basic.param_groups
        self.clip = float(engine.gradient_clipping() or 0.0)
        self._stage0_norm: float | None = None
        if self.layout.kind == "stage0" and self.clip > 0:
            self._wrap_stage0_clip()
        lp_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
        self.master = MasterStats(
            self.layout, optimizers, self._global_norm, self.clip, self.device, config.low_precision, lp_dtype
        )
        self.activations = (
            ActivationStats(
                self.model, self.device, config.low_precision, config.fp8_amax_history, config.max_logit_sequences
            )
            if config.activations
            else None
        )
        self.weight_amax = [AmaxHistory("e4m3", config.fp8_amax_history) for _ in self.names]
        self.grad_amax = [AmaxHistory("e5m2", config.fp8_amax_history) for _ in self.names]
        self.spikes = SpikeAlarm(config.spike_window, config.spike_zscore)
        self.events: list[dict[str, Any]] = []
        self._force_next = False
        self._armed = False

    # ---------------------------------------------------------------- interface
    def should_track(self, step: int, last: bool = False) -> bool:
        """Every ``tracking.interval`` steps, the run's last step (the end of a schedule is where AdamC and AdamW
        part), and the step after a gradient-norm spike (to name the layers)."""
        return self.config.enabled and (last or step % self.config.interval == 0 or self._force_next)

    def begin_step(self, step: int, last: bool = False) -> None:
        """Before the first forward of optimizer step ``step``: arm the hooks if this step is tracked."""
        if not self.should_track(step, last):
            return
        self._stage0_norm = None
        self.master.weight_scales = [h.scale() for h in self.weight_amax]
        self.master.grad_scales = [h.scale() for h in self.grad_amax]
        self.master.fp8_ready = all(h.ready for h in self.weight_amax)
        self.master.arm()
        if self.activations is not None:
            self.activations.arm()
        self._armed = True

    def end_step(self, step: int, loss: float | None = None, grad_norm: float | None = None) -> dict[str, float]:
        """After ``engine.step()``: the flat metrics dict (per-layer keys only on tracked steps).

        ``loss`` and ``grad_norm`` (the global norm, ``engine.get_global_grad_norm()``: it must be the same on every
        rank) feed the spike alarm; its z-scores are in the dict at every step once the window has filled, spike
        events in ``pop_events()``.
        """
        metrics: dict[str, float] = {}
        if self.config.enabled:
            z_metrics, spikes = self.spikes.observe(step, {"loss": loss, "grad_norm": _float(grad_norm)})
            metrics.update(z_metrics)
        else:
            spikes = []
        tracked = self._armed
        if tracked:
            self._armed = False
            self._force_next = False
            metrics.update(self._collect())
        if spikes:
            self.spikes.pending.extend(spikes)
            if not tracked and any(spike["kind"] == "grad_norm" for spike in spikes):
                # Track the next step to name the layers. Only on a grad-norm spike: the engine's global norm is
                # the same on every rank, so every rank decides alike (a per-rank loss could split the ranks
                # and hang the collective). A loss spike is completed at the next scheduled tracked step.
                self._force_next = True
        if tracked and self.spikes.pending:
            moved = self.spikes.moved_layers(metrics)
            for event in self.spikes.pending:
                event["layers_step"] = step
                event["top_layers"] = moved
            self.events.extend(self.spikes.pending)
            self.spikes.pending = []
        if tracked:
            self.spikes.remember(metrics)
        return metrics

    def pop_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue tracking as if uninterrupted: spike windows, FP8 amax histories."""
        state: dict[str, Any] = {
            "spikes": self.spikes.state_dict(),
            "weight_amax": [h.state_dict() for h in self.weight_amax],
            "grad_amax": [h.state_dict() for h in self.grad_amax],
            "force_next": self._force_next,
        }
        if self.activations is not None:
            state["activation_amax"] = [h.state_dict() for h in self.activations.histories]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spikes.load_state_dict(state.get("spikes", {}))
        for key, histories in (("weight_amax", self.weight_amax), ("grad_amax", self.grad_amax)):
            if len(state.get(key, [])) == len(histories):  # the same parameters (else: start the histories anew)
                for history, values in zip(histories, state[key], strict=True):
                    history.load_state_dict(values)
        saved_acts = state.get("activation_amax", [])
        if self.activations is not None and len(saved_acts) == len(self.activations.histories):
            for history, values in zip(self.activations.histories, saved_acts, strict=True):
                history.load_state_dict(values)
        self._force_next = bool(state.get("force_next", False))

    def close(self) -> None:
        self.master.remove()
        if self.activations is not None:
            self.activations.remove()

    # ---------------------------------------------------------------- internals
    def _wrap_stage0_clip(self) -> None:
        """Stage 0 fp32 clips in ``engine.clip_fp32_gradients`` and keeps no norm; keep the one it computes."""
        from deepspeed.runtime.utils import clip_grad_norm_

        engine = self.engine

        def clip_fp32_gradients() -> None:
            total = clip_grad_norm_(
                parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
            )
            self._stage0_norm = _float(total)

        engine.clip_fp32_gradients = clip_fp32_gradients

    def _global_norm(self) -> float | None:
        if self.layout.kind == "stage0":
            return self._stage0_norm
        return _float(getattr(self.engine.optimizer, "_global_grad_norm", None))

    def _world(self) -> int:
        return self.dist.get_world_size() if self.dist.is_initialized() else 1

    def _collect(self) -> dict[str, float]:
        master, acts = self.master, self.activations
        stepped = master.factor is not None  # no kernel call: a skipped (overflow) step
        master.disarm()
        if acts is not None:
            acts.disarm()
        sums = [master.sums, master.fp8_sums]
        if self.layout.replicated and self._world() > 1 and self.dist.get_rank() != 0:
            sums = [torch.zeros_like(t) for t in sums]  # every rank holds the whole tensor: count it once
        if acts is not None:
            sums += [acts.sums(), acts.fp8_sums]
        vector = torch.cat([t.reshape(-1) for t in sums])
        maxima = [master.maxima.reshape(-1)] if self.config.low_precision else []
        if acts is not None:
            maxima.append(acts.maxima)
        max_vector = torch.cat(maxima) if maxima else None
        if self._world() > 1:
            self.dist.all_reduce(vector)
            if max_vector is not None and max_vector.numel():
                self.dist.all_reduce(max_vector, op=self.dist.ReduceOp.MAX)
        values = vector.tolist()
        max_values = max_vector.tolist() if max_vector is not None else []
        n = len(self.names)
        table = [values[i * columns.NUM_COLUMNS : (i + 1) * columns.NUM_COLUMNS] for i in range(n)]
        offset = n * columns.NUM_COLUMNS
        width = 2 * fp8.NUM_SUMS
        fp8_table = [values[offset + i * width : offset + (i + 1) * width] for i in range(n)]
        offset += n * width
        metrics = self._master_metrics(table, fp8_table, max_values, stepped)
        if acts is not None:
            act_maxima = max_values[2 * n :] if self.config.low_precision else max_values
            metrics.update(self._activation_metrics(values[offset:], act_maxima))
        if self.config.low_precision:
            metrics.update(te_amax_metrics(self.model))
        return metrics

    def _master_metrics(self, table: list, fp8_table: list, max_values: list, stepped: bool) -> dict[str, float]:
        if not stepped:
            return {}
        metrics: dict[str, float] = {}
        totals = [0.0] * columns.NUM_COLUMNS
        fp8_totals = {"weight": [0.0] * fp8.NUM_SUMS, "grad": [0.0] * fp8.NUM_SUMS}
        for row, name in enumerate(self.names):
            w2, g2, wg, u2, changed, stale = table[row]
            totals = [a + b for a, b in zip(totals, table[row], strict=True)]
            metrics.update(parameter_metrics(name, w2, g2, wg, u2))
            metrics.update(self._predicted(row, name, ratio(norm(u2), norm(w2))))
            if self.master.lp_dtype is not None and self.config.low_precision and changed > 0:
                metrics[f"bf16_stale_frac/{name}"] = stale / changed
            if self.config.low_precision:
                amax = max_values[2 * row : 2 * row + 2]
                self.weight_amax[row].push(amax[columns.W_AMAX])
                self.grad_amax[row].push(amax[columns.G_AMAX])
                metrics[f"fp8/weight/amax/{name}"] = amax[columns.W_AMAX]
                metrics[f"fp8/grad/amax/{name}"] = amax[columns.G_AMAX]
                if self.master.fp8_ready:
                    halves = {"weight": fp8_table[row][: fp8.NUM_SUMS], "grad": fp8_table[row][fp8.NUM_SUMS :]}
                    scales = {"weight": self.master.weight_scales[row], "grad": self.master.grad_scales[row]}
                    for kind, part in halves.items():
                        fp8_totals[kind] = [a + b for a, b in zip(fp8_totals[kind], part, strict=True)]
                        metrics[f"fp8/{kind}/scale/{name}"] = scales[kind]
                        for stat, value in fp8.summarize(part).items():
                            metrics[f"fp8/{kind}/{stat}/{name}"] = value
        metrics["tracking/weight_norm"] = norm(totals[columns.W2])
        metrics["tracking/grad_norm"] = norm(totals[columns.G2])
        metrics["tracking/update_norm"] = norm(totals[columns.U2])
        metrics["tracking/clip_factor"] = self.master.factor if self.master.factor is not None else 1.0
        if self.master.lp_dtype is not None and self.config.low_precision and totals[columns.CHANGED] > 0:
            metrics["bf16_stale_frac"] = totals[columns.STALE] / totals[columns.CHANGED]
        if self.config.low_precision and self.master.fp8_ready:
            for kind, part in fp8_totals.items():
                for stat, value in fp8.summarize(part).items():
                    metrics[f"fp8/{kind}/{stat}"] = value
        return metrics

    def _predicted(self, row: int, name: str, update_ratio: float) -> dict[str, float]:
        """The steady-state prediction that applies to the group's optimizer, from this step's lr and the group's base
        lambda (AdamC's corrected decay if stamped): Adam groups (``betas``) get Defazio's Adam form and Kosson's
        rotational equilibrium of ||dx||/(lr ||x||), beside that measured ratio; SGD groups the SGD form of
        ||g||/||x|| (core/theory.py). The SGD form does not apply to Adam: Adam's raw gradient never settles."""
        index = self.layout.group_of_row[row]
        if index < 0:
            return {}
        group = self.param_groups[index]
        weight_decay = float(group.get("weight_decay", 0.0))  # AdamC's hooks have put the base lambda back
        lr = self.master.step_lrs[index]
        if weight_decay <= 0 or lr <= 0:
            return {}
        corrected = bool(group.get(ENABLED_KEY, False))
        lr_max = group.get(LR_MAX_KEY) if corrected else None
        beta1 = float(group["betas"][0]) if "betas" in group else None
        return {
            f"adamc_corrected/{name}": float(corrected),
            **predicted_forms(name, update_ratio, weight_decay, lr, lr_max, beta1),
        }

    def _activation_metrics(self, values: list[float], max_values: list[float]) -> dict[str, float]:
        acts = self.activations
        metrics: dict[str, float] = {}
        m = len(acts.modules)
        fp8_offset = 2 * m
        fp8_totals = [0.0] * fp8.NUM_SUMS
        for index, module in enumerate(acts.modules):
            metrics[f"act_rms/{module}"] = rms(values[2 * index], values[2 * index + 1])
            if self.config.low_precision:
                metrics[f"fp8/act/amax/{module}"] = max_values[index]
                part = values[fp8_offset + index * fp8.NUM_SUMS : fp8_offset + (index + 1) * fp8.NUM_SUMS]
                if acts.histories[index].ready and part[fp8.COUNT] > 0:
                    fp8_totals = [a + b for a, b in zip(fp8_totals, part, strict=True)]
                    metrics[f"fp8/act/scale/{module}"] = acts.histories[index].scale()
                    for stat, value in fp8.summarize(part).items():
                        metrics[f"fp8/act/{stat}/{module}"] = value
        if fp8_totals[fp8.COUNT] > 0:
            for stat, value in fp8.summarize(fp8_totals).items():
                metrics[f"fp8/act/{stat}"] = value
        for index, layer in enumerate(acts.layers):
            value = max_values[m + index] if len(max_values) > m + index else -math.inf
            if math.isfinite(value):
                metrics[f"max_attn_logit/{layer}"] = value
        acts.push_amax(max_values)
        return metrics


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
