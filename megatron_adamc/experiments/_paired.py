"""Paired differences over seeds with Student-t 95% intervals: what an "A is lower than B" claim is decided on.

Runs of two arms that share a seed share the initialization and the data order, so the difference per seed removes
most of the seed-to-seed spread; with n seeds its mean has the interval mean +- t(0.975, n-1) * sd / sqrt(n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# t(0.975, df) for df = 1..30 (two-sided 95%); beyond 30 the value at 30 (2.042) is used, a slightly wider interval.
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_interval(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std, n and the two-sided 95% t-interval [lo, hi] of the mean (lo = hi = mean for one value:
    no interval, which ``excludes_zero`` reads as "not resolvable")."""
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "lo": math.nan, "hi": math.nan}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = T975[min(n - 1, len(T975)) - 1] * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "lo": mean - half, "hi": mean + half}


def sign(interval: dict[str, float]) -> int:
    """-1 when the interval lies below 0, +1 above, 0 when it holds 0 (or there is none)."""
    if not math.isfinite(interval["lo"]) or not math.isfinite(interval["hi"]):
        return 0
    return -1 if interval["hi"] < 0 else 1 if interval["lo"] > 0 else 0


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, float]:
    """a - b over the seeds both have (``{seed: value}``), as ``t_interval``."""
    return t_interval([a[s] - b[s] for s in sorted(a) if s in b])
