"""Small-scale reproductions (issue 7): each experiment is one module with a pydantic ``Config`` and
``run(config, output_dir) -> dict`` that writes ``results.json`` and its plots under ``output_dir``.

The registry maps the CLI name to the module path, imported only when that experiment is asked for, so adding an
experiment is one line here and the CLI stays fast.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS: dict[str, str] = {
    "steady-state": "megatron_adamc.experiments.steady_state",
    "adamc-vs-adamw": "megatron_adamc.experiments.adamc_vs_adamw",
    "stability": "megatron_adamc.experiments.stability",
    "adamc-at-best": "megatron_adamc.experiments.adamc_at_best",
    "adam-steady-state": "megatron_adamc.experiments.adam_steady_state",
}


def load(name: str) -> ModuleType:
    """The experiment's module; KeyError for an unknown name (the CLI turns it into a one-line error)."""
    return importlib.import_module(EXPERIMENTS[name])
