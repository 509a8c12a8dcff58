"""Per-layer norm tracking for Megatron runs, on each rank's shard of the FP32 main params (docs/megatron.md).

Every N iterations (``--adamc-track-interval N``): torch's step pre/post hooks on Megatron's INNER optimizer (the
kernel that steps the FP32 main tensors, after Megatron has reduced, unscaled and clipped their gradients) sum, per
global parameter row, ||x||^2, ||g||^2, <x, g> and the step's ||dx||^2 over the main tensors of this rank
(``megatron_layout.py`` says which rows they are and which copies count), plus the step's lr, applied decay and beta1
of each row's group. After the step ONE SUM all-reduce over all ranks of that single float64 vector gives every
full parameter's sums (no gathers). Gradients are reported before clipping: Megatron clipped them by
clip / (||g|| + 1e-6) when that is below 1, and the global norm it returns undoes it (``core.norms.unclip_factor``).
The metrics (``core.norms``: the same keys as the DeepSpeed trainer's tracker, plus ``adamc_corrected/<name>``)
go to Megatron's TensorBoard and W&B writers and to ``metrics.jsonl`` (``megatron-adamc report`` reads it), written by
the last rank, where Megatron keeps its writers. With Transformer Engine FP8 on, TE's own amax history and scale per
module are added (a second, MAX all-reduce of a few values per TE module).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_adamc.core.adamc import ENABLED_KEY
from megatron_adamc.core.norms import norm as _norm
from megatron_adamc.core.norms import parameter_metrics, predicted_forms, ratio, slice_sums, unclip_factor, update_sums
from megatron_adamc.metrics_file import MetricsFile
from megatron_adamc.tracking.megatron_layout import MegatronLayout, build_layout, layer_renames, natural_key, rename
from megatron_adamc.tracking.sinks import write_tensorboard

# Columns per row: the sums, then the group facts summed over the contributing copies (divided by OWNERS after).
W2, G2, WG, U2, OWNERS, LR, WD, BETA1, CORRECTED = range(9)
NUM_COLUMNS = 9


class MegatronTracker:
    """Build it once the model and Megatron's optimizer exist; every rank calls ``begin_step``/``end_step``."""

    def __init__(
        self,
        optimizer: Any,
        model_chunks: list[torch.nn.Module],
        interval: int,
        clip: float,
        *,
        tp_rank: int = 0,
        dp_rank: int = 0,
        gather: Any = None,
        all_reduce: Any = None,
        all_reduce_max: Any = None,
        writer_rank: bool = False,
        tensorboard: Any = None,
        wandb: Any = None,
        metrics_dir: str | None = None,
        device: torch.device | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"--adamc-track-interval must be >= 1 (got {interval})")
        self.interval = interval
        self.clip = float(clip or 0.0)
        self.layout: MegatronLayout = build_layout(optimizer, model_chunks, tp_rank, dp_rank, gather)
        self.names = self.layout.names
        self.model_chunks = model_chunks
        self.all_reduce = all_reduce if all_reduce is not None else _world_all_reduce
        self.all_reduce_max = all_reduce_max if all_reduce_max is not None else _world_all_reduce_max
        self.te_modules = _te_modules(model_chunks, gather)
        self.writer_rank = writer_rank
        self.tensorboard = tensorboard
        self.wandb = wandb
        self.metrics = MetricsFile(metrics_dir) if metrics_dir and writer_rank else None
        first = next((main for main in _mains(self.layout)), None)
        self.device = device or (first.device if first is not None else torch.device("cpu"))
        self.sums = torch.zeros(len(self.names), NUM_COLUMNS, dtype=torch.float64, device=self.device)
        self.armed = False
        self._snapshots: dict[int, torch.Tensor] = {}
        self._handles = []
        for inner in self.layout.inner:
            self._handles.append(inner.register_step_pre_hook(self._pre))
            self._handles.append(inner.register_step_post_hook(self._post))

    # ------------------------------------------------------------------ interface
    def should_track(self, step: int) -> bool:
        return step % self.interval == 0

    def begin_step(self, step: int) -> None:
        """Before the forward of the iteration that ends at ``step`` (Megatron's logged, 1-based iteration)."""
        if self.should_track(step):
            self.sums.zero_()
            self._snapshots.clear()
            self.armed = True

    def end_step(self, step: int, grad_norm: float | None = None, extra: dict | None = None) -> dict[str, float]:
        """After the optimizer step: the metrics (empty when untracked or the update was skipped), written out."""
        if not self.armed:
            return {}
        self.armed = False
        self._snapshots.clear()
        factor = unclip_factor(_float(grad_norm), self.clip)
        self.sums[:, G2] *= factor * factor
        self.sums[:, WG] *= factor
        self.all_reduce(self.sums)
        metrics = self.metrics_from(self.sums.tolist())
        if metrics:
            metrics["tracking/clip_factor"] = factor
            metrics.update(self._fp8_metrics())
            self._write(step, {**(extra or {}), **metrics})
        return metrics

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ the sums
    @torch.no_grad()
    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.armed:
            return
        weights, grads, rows, facts = [], [], [], []
        for group in optimizer.param_groups:
            betas = group.get("betas")
            fact = [
                1.0,
                float(group["lr"]),
                float(group.get("weight_decay", 0.0)),
                float(betas[0]) if betas is not None else -1.0,
                float(bool(group.get(ENABLED_KEY, False)) and float(group.get("weight_decay", 0.0)) > 0.0),
            ]
            for main in group["params"]:
                entry = self.layout.find(main)
                if entry is None or not entry.counted or main.grad is None or main.numel() == 0:
                    continue
                weights.append(main.detach().reshape(-1))
                grads.append(main.grad.detach().reshape(-1).to(main.dtype))
                rows.append(entry.row)
                facts.append(fact)
                self._snapshots[id(main)] = main.detach().reshape(-1).clone()
        if not rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.sums[:, W2 : WG + 1].index_add_(0, index, slice_sums(weights, grads).to(self.device))
        fact_tensor = torch.tensor(facts, dtype=torch.float64, device=self.device)
        self.sums[:, OWNERS:].index_add_(0, index, fact_tensor)

    @torch.no_grad()
    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.armed:
            return
        diffs, rows = [], []
        for group in optimizer.param_groups:
            for main in group["params"]:
                old = self._snapshots.pop(id(main), None)
                if old is not None:
                    diffs.append(old.sub_(main.detach().reshape(-1)))  # the snapshot is spent: it holds -update
                    rows.append(self.layout.find(main).row)
        if diffs:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            self.sums[:, U2].index_add_(0, index, update_sums(diffs).to(self.device))

    # ------------------------------------------------------------------ the metrics
    def metrics_from(self, table: list[list[float]]) -> dict[str, float]:
        """Per-parameter and whole-model metrics from the all-reduced rows; {} when no rank stepped (skipped)."""
        if not any(row[OWNERS] > 0 for row in table):
            return {}
        metrics: dict[str, float] = {}
        totals = [0.0] * 4
        for name, row in zip(self.names, table, strict=True):
            owners = row[OWNERS]
            if owners <= 0:
                continue
            w2, g2, wg, u2 = row[:4]
            totals = [a + b for a, b in zip(totals, row[:4], strict=True)]
            metrics.update(parameter_metrics(name, w2, g2, wg, u2))
            lr, decay, beta1 = row[LR] / owners, row[WD] / owners, row[BETA1] / owners
            if decay > 0:
                metrics[f"adamc_corrected/{name}"] = float(row[CORRECTED] / owners > 0.5)
            # The applied decay is already lambda_t for a corrected group: the plain form of it is AdamC's prediction.
            beta = beta1 if beta1 >= 0 else None
            metrics.update(predicted_forms(name, ratio(_norm(u2), _norm(w2)), decay, lr, None, beta))
        metrics["tracking/weight_norm"] = _norm(totals[0])
        metrics["tracking/grad_norm"] = _norm(totals[1])
        metrics["tracking/update_norm"] = _norm(totals[3])
        return metrics

    def _fp8_metrics(self) -> dict[str, float]:
        """TE's own FP8 amax (largest in its history) and scale per TE module, over all ranks (MAX all-reduce);
        empty without Transformer Engine modules."""
        if not self.te_modules:
            return {}
        from megatron_adamc.tracking.transformer_engine import te_amax_metrics

        local: dict[str, float] = {}
        for chunk in self.model_chunks:
            for key, value in te_amax_metrics(chunk).items():
                kind, _, name = key.rpartition("/")
                local[f"{kind}/{_global_module(name)}"] = value
        keys = [f"fp8_te/{kind}/{name}" for name in self.te_modules for kind in _TE_KINDS]
        # Scales are reduced as MAX of -scale (the smallest scale is the one closest to overflow).
        values = [(-1.0 if "scale" in key else 1.0) * local.get(key, -math.inf) for key in keys]
        vector = torch.tensor([v if math.isfinite(v) else -math.inf for v in values], dtype=torch.float64)
        self.all_reduce_max(vector)
        out = {}
        for key, value in zip(keys, vector.tolist(), strict=True):
            if math.isfinite(value):
                out[key] = -value if "scale" in key else value
        return out

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.writer_rank:
            return
        if self.tensorboard is not None:
            write_tensorboard(self.tensorboard, metrics, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step)
        if self.metrics is not None:
            self.metrics.append({"step": step, **metrics})


_TE_KINDS = ("fwd_amax", "bwd_amax", "fwd_scale", "bwd_scale")


def _global_module(name: str) -> str:
    return global_module_names.get(name, name)


global_module_names: dict[str, str] = {}


def _te_modules(model_chunks: list[torch.nn.Module], gather: Any) -> list[str]:
    """Global names of every rank's Transformer Engine modules (those with an ``fp8_meta``), gathered once."""
    local = []
    for chunk in model_chunks:
        renames = layer_renames(chunk)
        for name, module in chunk.named_modules():
            if isinstance(getattr(module, "fp8_meta", None), dict):
                global_module_names[name] = rename(name, renames)
                local.append(global_module_names[name])
    if gather is None:
        from megatron_adamc.tracking.megatron_layout import _all_gather_names as gather
    names = {name for names in gather(sorted(local)) for name in names}
    return sorted(names, key=natural_key)


def _mains(layout: MegatronLayout):
    for inner in layout.inner:
        for group in inner.param_groups:
            yield from group["params"]


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _world_all_reduce(tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            moved = tensor.cuda()
            dist.all_reduce(moved)
            tensor.copy_(moved.cpu())
        else:
            dist.all_reduce(tensor)


def _world_all_reduce_max(tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        moved = tensor.cuda() if dist.get_backend() == "nccl" else tensor
        dist.all_reduce(moved, op=dist.ReduceOp.MAX)
        if moved is not tensor:
            tensor.copy_(moved.cpu())
