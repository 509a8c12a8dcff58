"""Measured over predicted steady state, per prediction form and per kind of layer, from tracked metric rows.

The tracker logs, per decayed parameter, the measured ratio and the prediction of each form that applies to its
optimizer (``tracker.Tracker._predicted``): SGD groups ``grad_weight_ratio`` against ``predicted_ratio``; Adam groups
``normalized_update_ratio`` (||dx|| / (lr ||x||)) against ``predicted_adam_ratio`` (Defazio's Adam form) and
``predicted_kosson_ratio`` (Kosson's rotational equilibrium). The report and the experiments read them through here,
so a figure is always set against the prediction of its own optimizer and says which one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

from megatron_adamc.core.theory import ADAM_FORM, KOSSON_FORM, LAYER_TYPES, SGD_FORM, layer_type


class Form(NamedTuple):
    """One prediction: its name, the measured key prefix it predicts, its own key prefix, and its label."""

    name: str
    measured: str
    predicted: str
    label: str


FORMS = {
    "sgd": Form("sgd", "grad_weight_ratio", "predicted_ratio", SGD_FORM),
    "adam": Form("adam", "normalized_update_ratio", "predicted_adam_ratio", ADAM_FORM),
    "kosson": Form("kosson", "normalized_update_ratio", "predicted_kosson_ratio", KOSSON_FORM),
}


# A step whose lr is below this share of the run's peak moves the FP32 weights by less than their rounding (a cosine
# to zero ends at lr ~1e-10): its measured update is mostly lost, so no steady state is read from it.
LR_FLOOR = 1e-3


def resolvable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose ``lr`` is at least LR_FLOOR of the largest lr among them (rows without an lr are kept)."""
    lrs = [r["lr"] for r in rows if _finite(r.get("lr"))]
    floor = LR_FLOOR * max(lrs) if lrs else 0.0
    return [r for r in rows if not _finite(r.get("lr")) or r["lr"] >= floor]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def forms_present(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The forms some row has a prediction of, in FORMS order (an Adam run: adam and kosson; SGD: sgd)."""
    found: set[str] = set()
    for row in rows:
        for form in FORMS.values():
            if form.name not in found and any(key.startswith(form.predicted + "/") for key in row):
                found.add(form.name)
    return [name for name in FORMS if name in found]


def row_ratios(row: dict[str, Any], form: str) -> dict[str, float]:
    """Per parameter of one row: measured / predicted for ``form`` (parameters with both numbers finite, > 0)."""
    spec = FORMS[form]
    out = {}
    prefix = spec.predicted + "/"
    for key, predicted in row.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        measured = row.get(f"{spec.measured}/{name}")
        if _finite(measured) and _finite(predicted) and predicted > 0:
            out[name] = measured / predicted
    return out


def geometric_mean(values: Iterable[float]) -> float | None:
    """Of the positive values (ratios to a line: 2x over and 2x under average to 1); None when there is none."""
    logs = [math.log(v) for v in values if v > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None


def per_parameter(rows: Iterable[dict[str, Any]], form: str) -> dict[str, float]:
    """Per parameter: the geometric mean of measured / predicted over the rows."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for name, value in row_ratios(row, form).items():
            values.setdefault(name, []).append(value)
    means = {name: geometric_mean(v) for name, v in values.items()}
    return {name: mean for name, mean in means.items() if mean is not None}


def by_layer_type(rows: Iterable[dict[str, Any]], form: str) -> dict[str, dict[str, float]]:
    """Per layer type: the geometric mean over that type's parameters of their geometric means of measured /
    predicted over the rows, the spread (min and max over the parameters) and how many parameters went in."""
    means = per_parameter(rows, form)
    out: dict[str, dict[str, float]] = {}
    for kind in LAYER_TYPES:
        logs = [math.log(v) for name, v in means.items() if layer_type(name) == kind]
        if logs:
            out[kind] = {
                "mean": math.exp(sum(logs) / len(logs)),
                "min": math.exp(min(logs)),
                "max": math.exp(max(logs)),
                "params": len(logs),
            }
    return out


def cosine_by_layer_type(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Mean cos(x, g) per layer type: how far each kind is from the orthogonality both forms assume."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("cos_weight_grad/") and _finite(value):
                sums.setdefault(layer_type(key.split("/", 1)[1]), []).append(value)
    return {kind: sum(v) / len(v) for kind, v in sums.items()}


def closer_form(ratios: dict[str, dict[str, float]]) -> str | None:
    """Of the forms in ``ratios`` (form -> {"mean": measured/predicted}), the one whose mean is nearest 1 in log."""
    scored = [(abs(math.log(v["mean"])), name) for name, v in ratios.items() if v and v.get("mean", 0) > 0]
    return min(scored)[1] if scored else None
