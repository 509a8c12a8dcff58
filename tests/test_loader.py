"""The background loader: exactly the synchronous path's micro batches (megatron-core GPTDataset on the default
corpus), exact resume from ``consumed_samples``, and workers that neither hang nor outlive their parent.

Runtime: ~10 s for the batches (the shared small corpus of the trainer tests is built once, ~1 min if absent),
~30 s for the lifecycle cases (each starts two interpreters; a dead parent is noticed within 5 s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL_CORPUS_DIR, subprocess_env
from workers.loader_lifecycle import children

from megatron_adamc.data import BatchLoader, batch_indices, build_gpt_datasets, collate, prepare_default_data
from megatron_adamc.errors import ConfigError

LIFECYCLE = Path(__file__).parent / "workers" / "loader_lifecycle.py"
MICRO, SEQ = 3, 32


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory: pytest.TempPathFactory):
    data = prepare_default_data(str(SMALL_CORPUS_DIR), vocab_size=512, max_bytes=400_000, progress=False)
    cache = str(tmp_path_factory.mktemp("index_cache"))
    train, _ = build_gpt_datasets(data.train_prefix, None, SEQ, 11, 600, None, data.tokenizer_model, cache)
    return train


def synchronous(dataset, consumed: int, steps: int, rank: int, dp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The trainer's current path: ``collate(batch_indices(...))`` on the training thread."""
    out = []
    for _ in range(steps):
        batch = collate(dataset, batch_indices(consumed, MICRO, rank, dp))
        out.append((batch["tokens"], batch["labels"]))
        consumed += MICRO * dp
    return out


def take(loader: BatchLoader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(steps)]


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for step, ((tokens, labels), (want_tokens, want_labels)) in enumerate(zip(got, want, strict=True)):
        assert tokens.dtype == torch.int64 and tokens.shape == (MICRO, SEQ), step
        assert torch.equal(tokens, want_tokens) and torch.equal(labels, want_labels), f"micro batch {step} differs"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_batches_as_synchronous_path_on_each_rank(train_ds, num_workers: int) -> None:
    steps, dp = 60, 2
    for rank in range(dp):
        with BatchLoader(train_ds, MICRO, rank, dp, 0, num_workers=num_workers, prefetch_factor=3) as loader:
            assert_same(take(loader, steps), synchronous(train_ds, 0, steps, rank, dp))
            assert loader.consumed_samples == steps * MICRO * dp
    # the two ranks read different samples (not one rank's batches twice)
    assert not torch.equal(synchronous(train_ds, 0, 1, 0, dp)[0][0], synchronous(train_ds, 0, 1, 1, dp)[0][0])


def test_restart_at_a_checkpointed_position_continues_exactly(train_ds) -> None:
    """Stop after 17 micro batches (prefetched ones are dropped), restart from ``consumed_samples``: the batches
    are those of an uninterrupted run; any position works, also one that is not a multiple of the global batch."""
    dp, rank = 2, 1
    straight = synchronous(train_ds, 0, 40, rank, dp)
    with BatchLoader(train_ds, MICRO, rank, dp, 0, num_workers=2, prefetch_factor=4) as loader:
        first = take(loader, 17)
        position = loader.consumed_samples
    with BatchLoader(train_ds, MICRO, rank, dp, position, num_workers=2, prefetch_factor=4) as loader:
        assert_same(first + take(loader, 23), straight)
    with BatchLoader(train_ds, MICRO, rank, dp, 101, num_workers=1) as loader:
        assert_same(take(loader, 5), synchronous(train_ds, 101, 5, rank, dp))


class FailingDataset:
    """Item ``bad`` raises, as a corrupt or vanished data file would."""

    def __init__(self, dataset, bad: int) -> None:
        self.dataset, self.bad = dataset, bad

    def __getitem__(self, i: int):
        if i == self.bad:
            raise OSError(f"sample {i}: cannot read the data file")
        return self.dataset[i]


def test_worker_exception_is_raised_in_the_parent(train_ds) -> None:
    with BatchLoader(FailingDataset(train_ds, bad=20), MICRO, 0, 1, 0, num_workers=2, prefetch_factor=2) as loader:
        assert_same(take(loader, 6), synchronous(train_ds, 0, 6, 0, 1))  # samples 0..17
        with pytest.raises(OSError, match="sample 20: cannot read the data file"):
            next(loader)


def test_killed_worker_is_an_error_not_a_hang(train_ds) -> None:
    before = set(children(os.getpid()))
    with BatchLoader(train_ds, MICRO, 0, 1, 0, num_workers=2, prefetch_factor=2) as loader:
        next(loader)
        workers = sorted(set(children(os.getpid())) - before)
        assert len(workers) == 2
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid"):
            os.kill(workers[0], signal.SIGKILL)
            for _ in range(1000):  # the SIGCHLD handler or the 5 s liveness check raises while we wait
                next(loader)
                time.sleep(0.02)
        assert time.monotonic() - started < 30


def test_an_interrupted_close_still_ends_every_worker(train_ds, monkeypatch) -> None:
    """A second Ctrl-C lands inside ``close`` (here: in the receiver's join). The workers ignore SIGTERM, so a close
    that stopped there used to leave them to multiprocessing's exit hook, which joined them forever (a trainer hung
    at exit). Now the interrupted close ends them anyway, and closing again is harmless."""
    from megatron_adamc.data import loader as loader_module

    before = set(children(os.getpid()))
    loader = BatchLoader(train_ds, MICRO, 0, 1, 0, num_workers=2, prefetch_factor=2)
    next(loader)
    workers = sorted(set(children(os.getpid())) - before)
    assert len(workers) == 2

    def interrupted(self) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loader_module._Receiver, "stop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loader.close()
    assert not set(workers) & set(children(os.getpid()))  # ended (and reaped) despite the interruption
    monkeypatch.undo()
    loader.close()


@pytest.mark.parametrize("case", ["exit", "kill", "term-group", "term-graceful"])
def test_workers_end_with_their_parent(case: str) -> None:
    """See tests/workers/loader_lifecycle.py: a subreaper starts a parent with 2 workers and ends it; within the
    deadline every worker has exited (and was reaped: no zombie), whatever the way the parent ended."""
    proc = subprocess.run(
        [sys.executable, str(LIFECYCLE), "reaper", case],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["workers"]) == 2
    assert report["alive"] == [], report
    expected_status = {"exit": 0, "kill": -signal.SIGKILL, "term-group": -signal.SIGTERM, "term-graceful": 0}
    assert report["parent_status"] == expected_status[case], report
    if case == "term-graceful":
        assert report["closed"], report  # the workers lived through SIGTERM and gave 2 more batches


def test_bad_settings_fail_in_one_line(train_ds) -> None:
    with pytest.raises(ConfigError, match="data.num_workers=-1"):
        BatchLoader(train_ds, MICRO, 0, 1, num_workers=-1)
    loader = BatchLoader(train_ds, MICRO, 0, 1, num_workers=0)
    loader.close()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)
