"""Checkpoints that survive any kill: DeepSpeed's own save/load plus what makes them safe to resume from.

Layout of ``RUN_DIR/checkpoints``: one ``step_N`` directory per checkpoint holding DeepSpeed's files, each rank's
``rng_rank{r}.pt``, rank 0's ``trainer_state.pt`` (step, data position, resolved config, guard and tracker state)
and, written last, ``manifest.json`` (sizes and CRC-32 of every file, see ``manifest.py``); ``latest`` names the
newest complete one (replaced atomically, and kept so DeepSpeed's own tools find it).

- Save: every rank writes; a write error (full disk, read-only) is caught inside DeepSpeed's checkpoint engine so the
  ranks stay in step through DeepSpeed's barriers, then agreed on: the partial directory is removed and the run
  stops with one line, the previous checkpoint untouched. Only then the checksums (each rank a share), the manifest,
  the pointer, and pruning.
- Load: candidates newest first; each is verified against its manifest (each rank a share) and skipped with a line
  naming it and why; none good is one line and nothing is deleted.
- Prune: the newest ``checkpoint.keep`` complete checkpoints stay, and so does anything not named ``step_N``.
"""

from __future__ import annotations

import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_adamc.errors import CheckpointError
from megatron_adamc.train import manifest
from megatron_adamc.train.component import due
from megatron_adamc.train.state import TrainerState

TAG_PREFIX = "step_"
TAG_RE = re.compile(r"^step_(\d+)$")
UNIVERSAL_SUFFIX = "_universal"
TRAINER_STATE = "trainer_state.pt"
POINTER = "latest"


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(value: Any) -> list[Any]:
    if _world() == 1:
        return [value]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, value)
    return out


def _first(reasons: list[str | None]) -> str | None:
    return next((r for r in reasons if r), None)


def _broadcast(value: Any) -> Any:
    if _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class Candidate:
    """A verified checkpoint and the trainer state saved with it."""

    tag: str
    step: int
    path: Path
    state: TrainerState


class Checkpointer:
    def __init__(self, config: Any, run_dir: Path, log: Callable[[str], None] = print) -> None:
        self.config = config  # the checkpoint section
        self.dir = run_dir / "checkpoints"
        self.log = log
        self.last_saved: str | None = None
        self.pending_set_aside: list[Path] | None = None  # find_resume's fresh start, for start_afresh

    # ------------------------------------------------------------------ decisions
    def should_save(self, step: int, last_step: bool) -> bool:
        return due(step, self.config.interval, last_step)

    # ------------------------------------------------------------------ listing
    def step_dirs(self) -> list[tuple[int, Path]]:
        """``step_N`` directories, newest first (anything else in the folder is left alone)."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir()]
        return sorted(found, reverse=True)

    def pointer(self) -> str | None:
        path = self.dir / POINTER
        try:
            return path.read_text().strip() or None
        except OSError:
            return None

    # ------------------------------------------------------------------ resume
    def find_resume(self, set_aside: bool = True) -> Candidate | None:
        """The newest verified checkpoint (same answer on every rank), None for a fresh run.

        A ``step_N`` without a manifest is a save that never completed, not a checkpoint: when nothing complete is
        left to resume, those are renamed aside (``set_aside``, the trainer: by ``start_afresh``) and the run starts
        afresh, its old ``metrics.jsonl`` set aside with them, so a requeued job never fails forever on a kill
        during its first save. Raises CheckpointError, deleting nothing, when a complete checkpoint exists but none
        verifies (the user decides), or when ``latest`` names a checkpoint but every ``step_N`` is gone (deleted?).
        """
        dirs = _broadcast([(step, str(path)) for step, path in self.step_dirs()] if _rank() == 0 else None)
        rejected: list[tuple[Path, str]] = []
        for step, path_str in dirs:
            path = Path(path_str)
            reason, state = self._verify(path), None
            if reason is None:
                try:
                    saved = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
                    state = TrainerState.from_state_dict(saved)
                    local = None
                except Exception as err:  # noqa: BLE001 - any unreadable state disqualifies the candidate
                    local = f"{TRAINER_STATE} unreadable ({type(err).__name__}: {err})"
                reason = _first(_gather(local))
            if reason is None:
                return Candidate(path.name, step, path, state)
            rejected.append((path, reason))
            self.log(f"checkpoint {path} skipped: {reason}")
        pointer = self.pointer()
        incomplete = [path for path, reason in rejected if reason == manifest.INCOMPLETE]
        if pointer is not None and not (self.dir / pointer).is_dir():
            gone = f"checkpoints/latest names {pointer}, but it is gone"
            if not rejected:
                raise CheckpointError(
                    f"{self.dir}: {gone} and no step_N folder is left (deleted?). Nothing was changed: restore the "
                    "checkpoints, or start a new run in another --output-dir"
                )
        if len(incomplete) < len(rejected) or (incomplete and pointer is not None):
            listed = "; ".join(f"{path.name} ({reason})" for path, reason in rejected)
            raise CheckpointError(
                f"no loadable checkpoint in {self.dir}: {listed}. Nothing was deleted; move the directory away to "
                "start a new run, or restore a good step_N from a backup"
            )
        if set_aside:
            self.pending_set_aside = incomplete  # renamed by start_afresh(), once the run is sure to start
        elif incomplete:
            raise CheckpointError(f"{self.dir}: no complete checkpoint (only saves that never completed: "
                                  f"{', '.join(p.name for p in incomplete)}); train further first")  # fmt: skip
        return None

    def start_afresh(self) -> None:
        """After ``find_resume`` found nothing to resume, and once the run is built (a refusal before this leaves the
        directory as it was): rank 0 renames aside what a fresh start would otherwise mix with, the saves that never
        completed and the rows of the attempt that made them (or of any attempt that saved nothing), each named in
        the log. Collective; a no-op after a resume."""
        from megatron_adamc.metrics_file import MetricsFile

        incomplete, self.pending_set_aside = self.pending_set_aside, None
        if incomplete is None:
            return

        metrics = MetricsFile(self.dir.parent / "metrics.jsonl")
        if _rank() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for path in incomplete:
                aside = path.with_name(f"{path.name}.incomplete-{stamp}")
                path.rename(aside)
                self.log(f"{path} is a save that never completed (no manifest.json), not a checkpoint: set aside "
                         f"as {aside.name}")  # fmt: skip
            if metrics.exists() and metrics.read().rows:
                rows = metrics.read().rows
                aside = metrics.path.with_name(f"metrics.set-aside-{stamp}.jsonl")  # still a metrics file to tools
                metrics.path.rename(aside)
                self.log(f"no checkpoint to resume, so the run starts at step 1; {metrics.path.name} held "
                         f"{len(rows)} rows up to step {rows[-1]['step']} of an earlier attempt: set aside as "
                         f"{aside.name}")  # fmt: skip
        _barrier()

    def _verify(self, path: Path) -> str | None:
        """Each rank checks a share of the files; the first problem any rank found, or None (collective)."""
        try:
            entries = manifest.read_manifest(path)["files"]
            if TRAINER_STATE not in entries:
                raise ValueError(f"the manifest lists no {TRAINER_STATE}")
            reason = manifest.verify_files(path, entries, sorted(entries)[_rank() :: _world()])
        except ValueError as err:
            reason = str(err)
        except OSError as err:
            reason = f"unreadable ({err.strerror or err})"
        return _first(_gather(reason))

    def load(self, engine: Any, candidate: Candidate, tag: str | None = None, restore_rng: bool = True) -> None:
        """Restore model and optimizer from ``candidate`` (or from ``tag`` in the same folder: a universal
        conversion of it), and this rank's RNG when it saved one."""
        load_path, _ = engine.load_checkpoint(str(self.dir), tag=tag or candidate.tag, load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {self.dir / (tag or candidate.tag)}")
        rng_file = candidate.path / f"rng_rank{_rank()}.pt"
        if restore_rng and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))

    # ------------------------------------------------------------------ save
    def save(self, engine: Any, step: int, trainer_state: dict[str, Any]) -> None:
        """Write ``step_N`` completely, or raise CheckpointError leaving the previous checkpoint as it was."""
        tag = tag_of(step)
        tag_dir = self.dir / tag
        if _rank() == 0:
            error = self._prepare(tag_dir)
        error = _broadcast(error if _rank() == 0 else None)
        if error:
            raise CheckpointError(error)
        errors: list[str] = []
        with CatchWriteErrors(engine, errors):
            engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        if not errors:
            try:
                torch.save(rng_state(), tag_dir / f"rng_rank{_rank()}.pt")
                if _rank() == 0:
                    torch.save(trainer_state, tag_dir / TRAINER_STATE)
            except OSError as err:
                errors.append(_describe(err, tag_dir))
        failed = [e for e in _gather(errors[0] if errors else None) if e]
        if not failed:
            files = _broadcast(manifest.list_files(tag_dir) if _rank() == 0 else None)
            try:
                share = {name: manifest.file_entry(tag_dir / name) for name in files[_rank() :: _world()]}
            except OSError as err:
                share = _describe(err, tag_dir)
            shares = _gather(share)
            failed = [s for s in shares if isinstance(s, str)]
        if failed:
            if _rank() == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
            _barrier()
            previous = f"the previous checkpoint {self.last_saved or self.pointer() or '(none)'} is intact"
            raise CheckpointError(f"saving checkpoint {tag_dir} failed: {failed[0]}; {previous}")
        if _rank() == 0:
            entries = {k: v for share in shares for k, v in share.items()}
            info = {"tag": tag, "step": step, "world_size": _world()}
            try:
                manifest.write_manifest(tag_dir, entries, info)
                manifest.atomic_write_text(self.dir / POINTER, tag)
                error = None
            except OSError as err:
                error = f"writing the manifest of {tag_dir} failed: {_describe(err, tag_dir)}"
        error = _broadcast(error if _rank() == 0 else None)
        if error:
            if _rank() == 0:
                (tag_dir / manifest.MANIFEST).unlink(missing_ok=True)
            raise CheckpointError(f"{error}; the previous checkpoint is intact")
        self.last_saved = tag
        if _rank() == 0:
            self.prune(keep_tag=tag)
        _barrier()

    def _prepare(self, tag_dir: Path) -> str | None:
        """Rank 0 before a save: a writable folder, room for one more checkpoint, no stale directory in the way."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-probe-{tag_dir.name}"
            probe.write_bytes(b"0" * 4096)
            probe.unlink()
        except OSError as err:
            return f"cannot write checkpoints to {self.dir}: {_describe(err, self.dir)}"
        need = self._last_size()
        free = shutil.disk_usage(self.dir).free
        if need and free < need * 1.05:
            return (
                f"{self.dir} has {free / 1e9:.2f} GB free and a checkpoint needs about {need / 1e9:.2f} GB: "
                "free space (or lower checkpoint.keep) and run again; the previous checkpoint is intact"
            )
        if tag_dir.exists():  # left by a save that did not complete, or replaced after a resume from an older one
            shutil.rmtree(tag_dir)
        return None

    def _last_size(self) -> int:
        for _, path in self.step_dirs():
            try:
                files = manifest.read_manifest(path)["files"]
            except ValueError:
                continue
            return sum(entry["size"] for entry in files.values())
        return 0

    def prune(self, keep_tag: str) -> None:
        """Rank 0: keep the newest ``keep`` complete checkpoints (and ``keep_tag``, the pointer's); remove the rest,
        incomplete leftovers and universal conversions older than the newest checkpoint."""
        complete = 0
        pointer = self.pointer()
        newest = int(keep_tag[len(TAG_PREFIX) :])
        for step, path in self.step_dirs():
            has_manifest = (path / manifest.MANIFEST).is_file()
            if path.name in (keep_tag, pointer):
                complete += 1
                continue
            if has_manifest and complete < self.config.keep:
                complete += 1
                continue
            if step < newest:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.dir.glob(f"{TAG_PREFIX}*{UNIVERSAL_SUFFIX}"):
            match = TAG_RE.match(path.name.removesuffix(UNIVERSAL_SUFFIX))
            if match and int(match.group(1)) < newest:
                shutil.rmtree(path, ignore_errors=True)


def verified_checkpoint(run_dir: Path, step: int | None = None, log: Callable[[str], None] = print) -> Path:
    """For tools that read a run (export): its newest verified checkpoint, or ``step_N`` verified. Needs no process
    group; raises CheckpointError naming what is wrong."""
    checkpointer = Checkpointer(None, run_dir, log)
    if step is None:
        candidate = checkpointer.find_resume(set_aside=False)
        if candidate is None:
            raise CheckpointError(f"{checkpointer.dir}: no checkpoint yet; train first, or pass --step N")
        return candidate.path
    path = checkpointer.dir / tag_of(step)
    if not path.is_dir():
        have = ", ".join(p.name for _, p in reversed(checkpointer.step_dirs())) or "none"
        raise CheckpointError(f"{path}: no such checkpoint; this run has: {have}")
    reason = checkpointer._verify(path)
    if reason is not None:
        raise CheckpointError(f"{path} fails verification: {reason}; pick another --step")
    return path


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _describe(err: Exception, where: Path) -> str:
    """One line for a failed write; a full file system is named as such whatever the exception says."""
    try:
        full = shutil.disk_usage(where if where.is_dir() else where.parent).free < 1 << 20
    except OSError:
        full = False
    if isinstance(err, OSError) and err.strerror:
        what = err.strerror
    else:
        what = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if full and "No space left" not in what:
        what = f"No space left on device ({what})"
    return f"{what} ({getattr(err, 'filename', None) or where})"


class CatchWriteErrors:
    """Inside DeepSpeed's save, turn a write error into a recorded message instead of an exception, so this rank
    still reaches DeepSpeed's barriers and the failure is agreed on after the save instead of hanging the others.
    Every write of DeepSpeed's save goes through these: its checkpoint engine's ``save``/``makedirs`` and the
    engine's copy of its recovery scripts (``zero_to_fp32.py``) beside the checkpoints."""

    def __init__(self, engine: Any, errors: list[str]) -> None:
        from megatron_adamc.deepspeed.internals import checkpoint_writers

        self.targets = checkpoint_writers(engine)
        self.errors = errors

    def __enter__(self) -> None:
        for target, name in self.targets:
            original = getattr(target, name)

            def guarded(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                if self.errors:
                    return None  # already failed: write nothing more
                try:
                    return _original(*args, **kwargs)
                except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
                    self.errors.append(_describe(err, Path(str(args[-1]) if args else ".")))
                    return None

            setattr(target, name, guarded)

    def __exit__(self, *exc: Any) -> None:
        for target, name in self.targets:
            vars(target).pop(name, None)  # back to the class's method
