"""Every number the results docs quote is read from its results JSON here: the tables are generated from the JSON
(``python tests/test_results_docs.py`` prints them) and each figure quoted in the prose is formatted from the JSON
and looked up verbatim (whitespace aside), so text and data cannot drift apart. Reads files only: no run, ~1 s.

Negative numbers are written with a minus sign (U+2212), as the docs do.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from results_format import DOCS, REPO, load
from results_quotes_adamc import (
    at_best_arms_table,
    at_best_comparisons_table,
    at_best_curve_table,
    at_best_layers_table,
    at_best_phase1_table,
    at_best_quotes,
    avw_best_table,
    avw_forms_table,
    avw_long_table,
    avw_mid_table,
    avw_quotes,
    avw_sweep_table,
)
from results_quotes_stability import stability_quotes, stability_table
from results_quotes_steady import (
    adam_quotes,
    overhead_quotes,
    overhead_sizes_table,
    overhead_table,
    steady_quotes,
    steady_table,
    tracking_quotes,
)

pytestmark = pytest.mark.unit  # make test-fast


# ------------------------------------------------------------------------------------------------------- README


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def readme_quotes() -> list[str]:
    """The README quotes the results docs' own phrases (formatted from the same JSON), the timings of its two
    commands (timings.json) and the user-error probe's counts (user_errors_probe.json)."""
    at_best, avw, steady, adam, stability = (
        at_best_quotes(),
        avw_quotes(),
        steady_quotes(),
        adam_quotes(),
        stability_quotes(),
    )
    pick = lambda quotes, *starts: [next(q for q in quotes if q.startswith(s)) for s in starts]  # noqa: E731
    timings = load("timings")
    probe = load("user_errors_probe")["summary"]
    return [
        *pick(
            at_best,
            "**Verdict:",
            "at the last step it is",
            "below 0 at",
            "lower in validation",
            "12.1 tokens",
            "80 min",
        ),
        *pick(avw, "(1.34x)", "still rises"),
        *pick(steady, "within 0.4%"),
        *pick(adam, "at 0.93 of it", "the lr exponent is"),
        *pick(stability, "(baseline d 64:", "QK-norm holds it", "best 3.78"),
        f"**{_minutes(timings['make_train_fresh_s'])}** from nothing",
        f"~{timings['make_train_steps_per_s']} steps/s",
        f"`final train loss {timings['make_train_final_train_loss']:.4f} | validation loss "
        f"{timings['make_train_final_val_loss']:.4f}`",
        f"**{_minutes(timings['make_test_venv_s'])}** with the venv present ({timings['pytest_passed']} passed, "
        f"{timings['pytest_skipped']} skipped), **{_minutes(timings['make_test_fresh_s'])}** the first time",
        f"{timings['test_fast_passed']} tests): **{_minutes(timings['make_test_fast_s'])}**",
        f"another run with the venv present took {_minutes(max(timings['make_test_venv_spread_s']))}",
        f"{probe['one_line']} of {probe['cases']} bad inputs and faults",
    ]


# ------------------------------------------------------------------------------------------------ registry + test

TABLES: dict[str, list[Callable[[], list[str]]]] = {
    "results_stability.md": [stability_table],
    "results_adamc_vs_adamw.md": [avw_sweep_table, avw_best_table, avw_mid_table, avw_long_table, avw_forms_table],
    "results_steady_state.md": [steady_table],
    "tracking.md": [overhead_table, overhead_sizes_table],
    "results_adamc_at_best.md": [
        at_best_phase1_table,
        at_best_arms_table,
        at_best_comparisons_table,
        at_best_curve_table,
        at_best_layers_table,
    ],
}
QUOTES: dict[str, list[Callable[[], list[str]]]] = {
    "results_stability.md": [stability_quotes],
    "results_adamc_vs_adamw.md": [avw_quotes],
    "results_steady_state.md": [steady_quotes],
    "results_adamc_at_best.md": [at_best_quotes],
    "results_adam_steady_state.md": [adam_quotes],
    "tracking.md": [tracking_quotes, overhead_quotes],
    "README.md": [readme_quotes],
}


@pytest.mark.parametrize("doc", sorted(set(TABLES) | set(QUOTES)))
def test_every_quoted_number_is_its_json(doc):
    text = (REPO / doc if doc == "README.md" else DOCS / doc).read_text()
    lines = set(text.splitlines())
    flat = " ".join(text.split())  # prose is rewrapped freely: a quote may span lines
    missing = [row for make in TABLES.get(doc, []) for row in make() if row not in lines]
    missing += [quote for make in QUOTES.get(doc, []) for quote in make() if " ".join(quote.split()) not in flat]
    assert missing == [], f"{doc}: not in the text (regenerate with python {Path(__file__).name}):\n" + "\n".join(
        missing
    )


if __name__ == "__main__":
    for doc, makers in TABLES.items():
        if len(sys.argv) > 1 and doc not in sys.argv[1:]:
            continue
        print(f"## {doc}")
        for make in makers:
            print("\n".join(make()), end="\n\n")
