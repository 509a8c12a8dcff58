"""FP8 headroom simulation under delayed scaling (the Transformer Engine recipe), with torch's float8 dtypes.

Delayed scaling picks the scale of step t from the amax of earlier steps: scale = fp8_max / max(history) / 2^margin.
A tensor that grows faster than the history can follow overflows (saturates at fp8_max); one that shrinks loses
its small elements to zero (underflow). Simulating the cast on the real tensors says how much headroom a run has
before it is switched to FP8, without FP8 hardware. E4M3 is used for weights and activations, E5M2 for gradients.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "e4m3": (torch.float8_e4m3fn, float(torch.finfo(torch.float8_e4m3fn).max)),
    "e5m2": (torch.float8_e5m2, float(torch.finfo(torch.float8_e5m2).max)),
}

# Columns of the per-tensor sums that fp8_sums returns (summed over ranks, then turned into fractions).
OVERFLOW, UNDERFLOW, NONZERO, ERROR_SQ, VALUE_SQ, COUNT = range(6)
NUM_SUMS = 6


def delayed_scale(history: deque[float] | list[float], fmt: str, margin: int = 0) -> float:
    """fp8_max / max(history) / 2^margin, or 1.0 (Transformer Engine's initial scale) without a usable history."""
    amax = max(history, default=0.0)
    if not (amax > 0 and math.isfinite(amax)):
        return 1.0
    return FORMATS[fmt][1] / amax / (2.0**margin)


@torch.no_grad()
def fp8_sums(x: torch.Tensor, scale: float, fmt: str) -> torch.Tensor:
    """The six sums of one tensor slice cast to ``fmt`` at ``scale`` (saturating, as TE casts), fp32 [6].

    overflow: |x * scale| > fp8_max; underflow: x != 0 but the cast is 0; error_sq: ||dequant(cast(x)) - x||^2.
    Sums, not fractions, so that slices on different ranks add up to the whole tensor.
    """
    dtype, fmax = FORMATS[fmt]
    x = x.detach().reshape(-1).float()
    scaled = x * scale
    overflow = (scaled.abs() > fmax).sum()
    quantized = scaled.clamp(-fmax, fmax).to(dtype).float()
    nonzero_mask = x != 0
    underflow = ((quantized == 0) & nonzero_mask).sum()
    error = quantized.div_(scale).sub_(x)
    return torch.stack(
        [
            overflow.float(),
            underflow.float(),
            nonzero_mask.sum().float(),
            torch.dot(error, error),
            torch.dot(x, x),
            torch.tensor(float(x.numel()), device=x.device),
        ]
    )


@dataclass
class AmaxHistory:
    """The amax of one tensor at the last ``length`` logged steps: the source of its delayed scale."""

    fmt: str
    length: int
    margin: int = 0
    values: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown fp8 format {self.fmt!r}: use one of {sorted(FORMATS)}")
        self.values = deque(self.values, maxlen=self.length)

    @property
    def ready(self) -> bool:
        """No scale is known before the first amax: the first logged step only records it."""
        return len(self.values) > 0

    def scale(self) -> float:
        return delayed_scale(self.values, self.fmt, self.margin)

    def push(self, amax: float) -> None:
        if math.isfinite(amax):
            self.values.append(amax)

    def state_dict(self) -> list[float]:
        return list(self.values)

    def load_state_dict(self, values: list[float]) -> None:
        self.values = deque(values, maxlen=self.length)


def summarize(sums: list[float]) -> dict[str, float]:
    """Fractions and relative error from the summed columns of ``fp8_sums``."""
    count, nonzero = sums[COUNT], sums[NONZERO]
    return {
        "overflow_frac": sums[OVERFLOW] / count if count else math.nan,
        "underflow_frac": sums[UNDERFLOW] / nonzero if nonzero else math.nan,
        "rel_error": math.sqrt(sums[ERROR_SQ] / sums[VALUE_SQ]) if sums[VALUE_SQ] > 0 else math.nan,
    }
