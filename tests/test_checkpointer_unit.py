"""The checkpointer's file rules without a trainer: manifests verify, pruning keeps what must stay and leaves foreign
names alone, a tool finds the newest verified checkpoint."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_adamc.errors import CheckpointError
from megatron_adamc.train import manifest
from megatron_adamc.train.checkpointer import Checkpointer, verified_checkpoint

pytestmark = pytest.mark.unit  # make test-fast


def _checkpoint(ckpt_dir: Path, name: str, complete: bool = True) -> Path:
    path = ckpt_dir / name
    path.mkdir(parents=True)
    (path / "trainer_state.pt").write_bytes(b"state " + name.encode())
    (path / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)
    if complete:
        entries = {n: manifest.file_entry(path / n) for n in manifest.list_files(path)}
        manifest.write_manifest(path, entries, {"tag": name})
    return path


def test_prune_keeps_the_newest_complete_and_foreign_names(tmp_path) -> None:
    ckpt = tmp_path / "checkpoints"
    for name, complete in [("step_2", True), ("step_4", True), ("step_5", False), ("step_6", True), ("step_8", True)]:
        _checkpoint(ckpt, name, complete)
    for foreign in ("notes", "step_x", "step_6.bak"):
        (ckpt / foreign).mkdir()
    (ckpt / "step_4_universal").mkdir()
    (ckpt / "latest").write_text("step_6")  # a pointer left behind: never removed
    Checkpointer(SimpleNamespace(keep=2), tmp_path).prune(keep_tag="step_8")
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "notes", "step_6", "step_6.bak", "step_8", "step_x"]


def test_verification_finds_every_kind_of_damage(tmp_path) -> None:
    path = _checkpoint(tmp_path / "checkpoints", "step_3")
    entries = manifest.read_manifest(path)["files"]
    assert manifest.verify_files(path, entries, sorted(entries)) is None
    data = (path / "mp_rank_00_model_states.pt").read_bytes()
    (path / "mp_rank_00_model_states.pt").write_bytes(data[:-1] + b"X")
    assert "fails its checksum" in manifest.verify_files(path, entries, sorted(entries))
    (path / "mp_rank_00_model_states.pt").write_bytes(data[:10])
    assert "has 10 bytes, the manifest says 700" in manifest.verify_files(path, entries, sorted(entries))
    (path / "trainer_state.pt").unlink()
    assert "trainer_state.pt is missing" == manifest.verify_files(path, entries, ["trainer_state.pt"])


def test_verified_checkpoint_for_tools(tmp_path) -> None:
    ckpt = tmp_path / "checkpoints"
    _checkpoint(ckpt, "step_2")
    newest = _checkpoint(ckpt, "step_4")
    (newest / "trainer_state.pt").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="fails verification: trainer_state.pt has 4 bytes"):
        verified_checkpoint(tmp_path, step=4)
    with pytest.raises(CheckpointError, match=r"step_9: no such checkpoint; this run has: step_2, step_4"):
        verified_checkpoint(tmp_path, step=9)
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        verified_checkpoint(tmp_path / "empty")


def test_a_killed_builds_jit_lock_is_removed_and_a_live_builds_is_named(tmp_path, monkeypatch, capsys) -> None:
    import os
    import subprocess
    import time

    from megatron_adamc.train.jit_locks import watch_for_stale_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "py311_cpu" / "fused_adam" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
        os.utime(lock, (time.time() - 600, time.time() - 600))  # ten minutes old
    builder = subprocess.Popen(["sleep", "30"], cwd=live.parent)  # what a running ninja build looks like
    try:
        with watch_for_stale_locks(patience_s=0.05):
            time.sleep(0.5)  # an op load that does not come back
    finally:
        builder.kill()
        builder.wait()
    err = capsys.readouterr().err
    assert not stale.exists() and f"removed {stale}: a JIT build lock left by a killed process" in err
    assert live.exists() and f"still waiting for {live}" in err and "delete that file to continue" in err
    assert f"still waiting for {stale}" not in err
    live.unlink()
    with watch_for_stale_locks(patience_s=0.05):
        pass  # a load that returns in time says nothing
    assert capsys.readouterr().err == ""
