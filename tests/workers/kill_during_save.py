"""``megatron-adamc train`` that SIGKILLs itself at one point of its Nth checkpoint save (a real kill -9).

Usage: kill_during_save.py POINT N train --config ... (the rest is the CLI's argv). The points cover every window of
a save: inside DeepSpeed's files, after them, before/while writing the manifest, before the pointer, while pruning.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

from megatron_adamc.cli import main
from megatron_adamc.train import checkpointer, manifest

POINT, NTH = sys.argv[1], int(sys.argv[2])
saves = {"n": 0}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def armed() -> bool:
    return saves["n"] == NTH


original_save = checkpointer.Checkpointer.save


def counting_save(self, engine, step, state):
    saves["n"] += 1
    if armed() and POINT == "mid_deepspeed":
        target = engine.checkpoint_engine
        write = target.save

        def save_then_die(state_dict, path):
            write(state_dict, path)
            die()

        target.save = save_then_die
    return original_save(self, engine, step, state)


def wrap(module, name, before=None, after=None):
    function = getattr(module, name)

    def wrapped(*args, **kwargs):
        if armed() and before is not None and before(*args, **kwargs):
            die()
        out = function(*args, **kwargs)
        if armed() and after is not None and after(*args, **kwargs):
            die()
        return out

    setattr(module, name, wrapped)


checkpointer.Checkpointer.save = counting_save
if POINT == "after_deepspeed":
    wrap(checkpointer, "rng_state", before=lambda: True)
elif POINT == "before_manifest":
    wrap(manifest, "write_manifest", before=lambda *a: True)
elif POINT == "torn_manifest":

    def torn(path, text):
        if armed() and path.name == manifest.MANIFEST:
            path.write_text(text[: len(text) // 2])  # a non-atomic writer would leave this behind
            die()
        return atomic(path, text)

    atomic = manifest.atomic_write_text
    manifest.atomic_write_text = torn
elif POINT == "before_pointer":
    wrap(manifest, "atomic_write_text", before=lambda path, text: path.name == checkpointer.POINTER)
elif POINT == "during_prune":
    rmtree = shutil.rmtree

    def half_rmtree(path, *args, **kwargs):
        if armed():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            files[0].unlink()  # the kill lands in the middle of removing an old checkpoint
            die()
        return rmtree(path, *args, **kwargs)

    checkpointer.shutil.rmtree = half_rmtree
elif POINT != "mid_deepspeed":
    raise SystemExit(f"unknown point {POINT}")

sys.exit(main(sys.argv[3:]))
