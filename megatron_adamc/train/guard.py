"""The divergence guard: decides, at each step, whether its update may be applied and whether the run must stop.

A step is bad when its loss (mean over ranks) is not finite, when DeepSpeed skipped its update because the gradients
were not finite, or, with ``train.spike_skip_ratio`` set, when its loss exceeds that ratio of the running mean of
the last ``train.spike_skip_window`` good losses. A bad step's update is never applied: the trainer poisons the last
backward so that DeepSpeed's own overflow check (every ZeRO stage; ``zero0_overflow_guard`` below for stage 0)
discards the gradients on every rank alike. After ``train.max_bad_steps`` bad steps in a row the run stops with
``DivergenceError``. Every decision uses values all ranks share (all-reduced loss, DeepSpeed's all-reduced overflow
flag), so the ranks never disagree.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

NONFINITE_LOSS = "nonfinite_loss"
NONFINITE_GRAD = "nonfinite_grad"
LOSS_SPIKE = "loss_spike"


class DivergenceGuard:
    def __init__(
        self,
        max_bad_steps: int,
        spike_ratio: float | None = None,
        spike_skip_window: int = 50,
        max_weight_growth: float | None = None,
    ) -> None:
        self.max_bad_steps = max_bad_steps
        self.spike_ratio = spike_ratio
        self.window: deque[float] = deque(maxlen=spike_skip_window)
        self.consecutive_bad = 0
        self.skipped_total = 0
        self.max_weight_growth = max_weight_growth
        self.weight_norm: tuple[int, float] | None = None  # (step, norm) of the last saved (or starting) weights

    @classmethod
    def from_config(cls, train: Any) -> DivergenceGuard:
        return cls(train.max_bad_steps, train.spike_skip_ratio, train.spike_skip_window, train.max_weight_growth)

    # A finite loss does not make a checkpoint usable: after an lr blow-up the weights can reach 1e29 while the loss
    # stays finite, and resuming from them diverges at once whatever the lr. So every save compares the weights'
    # norm with the run's own history (the last saved weights, or those it started from) and refuses a jump.
    def observe_start(self, step: int, norm: float) -> None:
        """The weights the run starts (or resumes) from: the first reference, unless a checkpoint carried one."""
        if self.weight_norm is None and math.isfinite(norm):
            self.weight_norm = (step, norm)

    def unusable_weights(self, step: int, norm: float) -> str | None:
        """Why weights of norm ``norm`` at ``step`` must not be saved as a checkpoint (None: they may)."""
        if not math.isfinite(norm):
            return f"the weights' norm is {norm}"
        if self.max_weight_growth is None or self.weight_norm is None:
            return None
        ref_step, ref = self.weight_norm
        if ref > 0 and norm > self.max_weight_growth * ref:
            return (
                f"the weights' norm {norm:.4g} is {norm / ref:.3g}x that at step {ref_step} ({ref:.4g}), above "
                f"train.max_weight_growth={self.max_weight_growth:g}: the weights blew up"
            )
        return None

    def weights_saved(self, step: int, norm: float) -> None:
        self.weight_norm = (step, norm)

    def pre_update(self, loss: float) -> str | None:
        """Before the last backward, from the step's mean loss over ranks: a reason to skip the update, or None."""
        if not math.isfinite(loss):
            return NONFINITE_LOSS
        if self.spike_ratio is not None and len(self.window) == self.window.maxlen:
            mean = sum(self.window) / len(self.window)
            if loss > self.spike_ratio * mean:
                return LOSS_SPIKE
        return None

    def post_update(self, loss: float, reason: str | None, skipped_by_deepspeed: bool) -> str | None:
        """After the step: the reason it was bad (None: good). Updates the streak and the spike window."""
        if reason is None and skipped_by_deepspeed:
            reason = NONFINITE_GRAD
        if reason is None:
            self.consecutive_bad = 0
            self.window.append(loss)
            return None
        self.consecutive_bad += 1
        self.skipped_total += 1
        return reason

    @property
    def diverged(self) -> bool:
        return self.consecutive_bad >= self.max_bad_steps

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": list(self.window), "consecutive_bad": self.consecutive_bad, "skipped": self.skipped_total,
            "weight_norm": list(self.weight_norm) if self.weight_norm is not None else None,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.extend(state.get("window", []))
        self.consecutive_bad = int(state.get("consecutive_bad", 0))
        self.skipped_total = int(state.get("skipped", 0))
        if state.get("weight_norm") is not None:
            step, norm = state["weight_norm"]
            self.weight_norm = (int(step), float(norm))


def weight_norm(engine: Any) -> float:
    """The L2 norm of all the model's weights, the same on every rank: ZeRO-3 sums each rank's partition (one
    all-reduce); below stage 3 every rank holds every weight, so no collective is needed."""
    import torch.distributed as dist

    params = list(engine.module.parameters())
    partitioned = [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]
    tensors = [t.detach() for t in (partitioned or params) if t.numel()]
    # In float64: blown-up weights (~1e29) overflow a float32 sum of squares, and that norm is what is reported.
    norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors] or [
        torch.zeros((), dtype=torch.float64)
    ]
    total = torch.stack([n.cpu() for n in norms]).square().sum()
    if partitioned and dist.is_initialized():
        total = total.to(next(iter(params)).device if params else "cpu")
        dist.all_reduce(total)
    return float(total.double().cpu().sqrt())


def poison(loss: torch.Tensor) -> torch.Tensor:
    """The loss times NaN: its backward makes every gradient NaN, so DeepSpeed's overflow check skips the update."""
    return loss * torch.tensor(math.nan, dtype=loss.dtype, device=loss.device)


def zero0_overflow_guard(optimizer: torch.optim.Optimizer) -> None:
    """ZeRO stage 0 without fp16 hands the gradients straight to the base optimizer, which would apply NaNs.

    Give that optimizer what DeepSpeed's wrappers have: an ``overflow`` flag, set when any gradient is not finite,
    in which case the step is not taken. The engine reads the flag after ``step()`` and counts a skipped step (its
    gradients were all-reduced before, so every rank sees the same values and decides alike).
    """
    if getattr(optimizer, "_megatron_adamc_overflow_guard", False):
        return
    step = optimizer.step

    def guarded_step(*args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms = torch._foreach_norm(grads, ord=math.inf) if grads else []  # max |g|: finite unless a value is not
        optimizer.overflow = bool(grads) and not bool(torch.isfinite(torch.stack(norms)).all())
        if optimizer.overflow:
            return None
        return step(*args, **kwargs)

    optimizer.step = guarded_step
    optimizer.overflow = False
    optimizer._megatron_adamc_overflow_guard = True
