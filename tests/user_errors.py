"""What the user-error tests (tests/test_user_errors_*.py) share: run a command line in process and assert the one
line, its exit code and that the watched paths are byte-identical afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_adamc.cli import main


def state_of(path: Path) -> object:
    """Every file and folder under ``path`` with its bytes (a file: its bytes; missing: None)."""
    if not os.path.lexists(path):
        return None
    if not path.is_dir():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(path.rglob("*"))}


def refused(capsys, argv: list, code: int, *expected: str, watch: tuple[Path, ...] = ()) -> str:
    """Run the command line; assert its exit code, exactly one error line holding ``expected``, no traceback, and
    every ``watch`` path unchanged. Returns the line."""
    before = [state_of(p) for p in watch]
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line or line.endswith(": interrupted")]
    assert rc == code, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert [state_of(p) for p in watch] == before
    return lines[0]


@pytest.fixture
def no_process_group(monkeypatch):
    """A case that passed preflight would start a process group in the test process: fail it instead."""
    from megatron_adamc.train import trainer

    def refuse(*_a, **_k):
        raise AssertionError("preflight let this case through: the trainer would start")

    monkeypatch.setattr(trainer, "init_distributed", refuse)


def ensure_small_corpus() -> Path:
    """The tests' shared small default corpus (SMALL_TRAIN_SETS), built here if no earlier test built it."""
    from conftest import SMALL_CORPUS_DIR

    from megatron_adamc.data import prepare_default_data

    prepare_default_data(str(SMALL_CORPUS_DIR), 512, 400_000, progress=False)  # a no-op once built
    return SMALL_CORPUS_DIR


@pytest.fixture(scope="session")
def small_corpus() -> Path:
    return ensure_small_corpus()
