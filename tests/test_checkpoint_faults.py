"""Checkpoints under faults, with real processes: a kill -9 in every window of a save, every kind of file corrupted
or truncated, a torn metrics line, a full disk and a read-only output directory. Whatever happens, a rerun continues
from the last good checkpoint and ends with the same losses as a run that never failed (bitwise: one process,
torch's AdamW kernel), or stops with one line and destroys nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import WORKERS
from trainer_runs import error_lines, losses, run, snapshot, train_cmd

STEPS = 6
SETS = ["checkpoint.interval=2", "checkpoint.keep=2", "eval.interval=3", "tracking.interval=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run, holding step_4 and step_6: the reference, and what each corruption test copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(train_cmd(out, *SETS, steps=STEPS))
    return out


@pytest.fixture(scope="module")
def reference(finished) -> list[tuple[int, float]]:
    """The uninterrupted run's losses."""
    return losses(finished)


def pointer(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text()


@pytest.mark.parametrize(
    ("point", "nth", "pointer_after_kill"),
    [
        ("mid_deepspeed", 2, "step_2"),  # one of DeepSpeed's files written, the rest not
        ("after_deepspeed", 2, "step_2"),  # DeepSpeed's files complete, no RNG / trainer state / manifest
        ("before_manifest", 2, "step_2"),
        ("torn_manifest", 2, "step_2"),  # half a manifest on disk (what a non-atomic write leaves)
        ("before_pointer", 2, "step_2"),  # complete and verified, the pointer still on the previous one
        ("during_prune", 3, "step_6"),  # the new checkpoint is published; an old one half removed
    ],
)  # fmt: skip
def test_kill_during_save_resumes_from_last_good(tmp_path, reference, point, nth, pointer_after_kill):
    out = tmp_path / "run"
    head = [str(WORKERS / "kill_during_save.py"), point, str(nth)]
    killed = run(train_cmd(out, *SETS, steps=STEPS, head=head), check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert pointer(out) == pointer_after_kill
    rerun = run(train_cmd(out, *SETS, steps=STEPS))
    text = rerun.stdout + rerun.stderr
    if point == "during_prune":
        assert "run already complete at step 6" in text
    elif point == "before_pointer":
        assert "resumed from" in text and "step_4 at step 4" in text  # complete: used although not pointed to
    else:
        assert "step_4 skipped" in text and "resumed from" in text and "step_2 at step 2" in text
    assert losses(out) == reference
    assert pointer(out) == "step_6"


CORRUPTIONS = {
    "truncated_optimizer_states": lambda d: _truncate(next(d.glob("*optim_states.pt"))),
    "flipped_model_states": lambda d: _flip(next(d.glob("mp_rank_00_model_states.pt"))),
    "empty_rng": lambda d: (d / "rng_rank0.pt").write_bytes(b""),
    "missing_trainer_state": lambda d: (d / "trainer_state.pt").unlink(),
    "garbage_manifest": lambda d: (d / "manifest.json").write_text("{not json"),
}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed: only the checksum sees it
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupted_newest_checkpoint_is_skipped(tmp_path, finished, reference, kind):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    CORRUPTIONS[kind](out / "checkpoints" / "step_6")
    rerun = run(train_cmd(out, *SETS, "train.steps=8", steps=STEPS))
    text = rerun.stdout + rerun.stderr
    assert "checkpoint" in text and "step_6 skipped" in text, text[-2000:]
    assert "resumed from" in text and "step_4 at step 4" in text
    assert losses(out)[:4] == reference[:4] and [s for s, _ in losses(out)] == list(range(1, 9))


def test_pointer_to_a_missing_tag_and_torn_metrics_line(tmp_path, finished, reference):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoints" / "latest").write_text("step_99")
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "loss": 3.')  # a crash mid-append
    rerun = run(train_cmd(out, *SETS, "train.steps=7", steps=STEPS))
    text = rerun.stdout + rerun.stderr
    assert "dropped 1 torn line" in text and "step_6 at step 6" in text
    assert losses(out)[:6] == reference and [s for s, _ in losses(out)] == list(range(1, 8))


def test_no_good_checkpoint_is_one_line_and_deletes_nothing(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for tag in ("step_4", "step_6"):
        _truncate(out / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    before = snapshot(out)
    proc = run(train_cmd(out, *SETS, "train.steps=8", steps=STEPS), check=False)
    assert proc.returncode == 4, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "no loadable checkpoint in" in line and "step_6 (" in line and "step_4 (" in line
    assert "Nothing was deleted" in line and "Traceback" not in proc.stderr
    assert snapshot(out) == before


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (root only, as in CI)."""
    mounts = []

    def mount(size_kb: int) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)]
        proc = subprocess.run(cmd, capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, small_disk, finished, reference):
    size = sum(f.stat().st_size for f in (finished / "checkpoints" / "step_6").iterdir())
    disk = small_disk((int(size * 2.6) + 200_000) // 1024)  # two checkpoints and the logs fit, a third does not
    out = disk / "run"
    proc = run(train_cmd(out, *SETS, "checkpoint.keep=5", steps=STEPS), check=False)
    assert proc.returncode == 4, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "GB free and a checkpoint needs about" in line and "the previous checkpoint is intact" in line
    assert pointer(out) == "step_4"
    # The run directory is intact: with room made, the same run continues and matches the reference.
    shutil.rmtree(out / "checkpoints" / "step_2")
    run(train_cmd(out, *SETS, "checkpoint.keep=5", steps=STEPS))
    assert losses(out) == reference


def test_disk_full_inside_the_first_save(tmp_path, small_disk):
    disk = small_disk(600)  # the logs fit, not one checkpoint: DeepSpeed's own write fails midway
    out = disk / "run"
    proc = run(train_cmd(out, *SETS, steps=STEPS), check=False)
    assert proc.returncode == 4, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "saving checkpoint" in line and "No space left on device" in line
    assert not (out / "checkpoints" / "step_2").exists()  # the partial directory is gone, space freed


def test_read_only_output_is_one_line(tmp_path, small_disk, finished):
    disk = small_disk(20_000)
    out = disk / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    proc = run(train_cmd(out, *SETS, "train.steps=8", steps=STEPS), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "is on a read-only file system; choose another path" in line
    assert snapshot(out) == before
