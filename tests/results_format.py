"""What the results docs' checks share: reading a results JSON and writing numbers the way the docs do (a real
minus sign, U+2212; ``mean ± std``; two-sided 95% Student-t intervals)."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t(0.975, df)


@cache
def load(name: str) -> dict:
    return json.loads((DOCS / "results" / f"{name}.json").read_text())


def num(x: float, digits: int, plus: bool = False) -> str:
    """Fixed-point with a real minus sign (and an explicit + when asked)."""
    text = f"{x:+.{digits}f}" if plus else f"{x:.{digits}f}"
    return text.replace("-", "−")


def pm(stat: dict, digits: int, plus: bool = False) -> str:
    """mean ± std (sample std over seeds), as the older results state their spread."""
    return f"{num(stat['mean'], digits, plus)} ± {num(stat['std'], digits)}"


def interval(stat: dict, digits: int) -> str:
    """The two-sided 95% Student-t interval of a mean from its mean, std and n: ``[lo, hi]``."""
    half = T975[stat["n"] - 1] * stat["std"] / math.sqrt(stat["n"])
    return f"[{num(stat['mean'] - half, digits)}, {num(stat['mean'] + half, digits)}]"


def g3(x: float) -> str:
    """3 significant digits; large values in e-notation (the max attention logits)."""
    return f"{x:.1e}" if abs(x) >= 1e4 else f"{x:.3g}"


def num_range(values: list[float], digits: int) -> str:
    """``lo-hi`` at ``digits`` decimals, or one value when both round alike."""
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}-{hi}"
