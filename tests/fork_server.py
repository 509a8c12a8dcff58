"""Trainer runs for the tests, forked from a process that imported torch, DeepSpeed and megatron-core once.

A fresh ``python -m megatron_adamc.cli train`` spends seconds importing before its first line of work, and the suite
starts a hundred of them. The server below imports once; each run is a fork of it, with its own argv, environment,
working directory and output files, ending the way the interpreter ends (atexit handlers, exit code; a signal gives
the negative code ``subprocess`` reports). Nothing is initialized before the fork (no process group, no RNG draw, no
thread), so a forked run logs bit for bit what the same command logs in a fresh process (the experiments' fork
server is tested for exactly that; ``test_forked_run_equals_a_fresh_process`` checks it here).

Multi-rank commands (``torch.distributed.run ... --nproc-per-node=N``) fork N ranks with torchrun's environment
variables set, sharing the output files; the exit code is that of the first rank that failed. Tests that test
torchrun itself (its exit codes, elastic restarts) or signals sent to a trainer keep real processes.

The server is single-threaded on purpose: forking while another thread holds a lock (stdout's, the allocator's)
would leave the child holding it forever. It reads requests from stdin and writes replies with ``os.write``.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------- server
# The experiments' preload (torch, DeepSpeed, megatron-core's datasets, the trainer; it silences their import-time
# notices itself), then what a CLI run imports beyond it.
PRELOAD = ("megatron_adamc.experiments._fork_preload", "megatron_adamc.cli", "megatron_adamc.cli.train",
           "megatron_adamc.tracking.tracker")  # fmt: skip


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


_REPLIES = 1  # the fd replies go to: the pipe the client reads (serve() moves it off stdout)


def _reply(message: dict) -> None:
    os.write(_REPLIES, (json.dumps(message) + "\n").encode())


def _child(request: dict) -> None:
    """In the fork: become the requested process, then run it; never returns (SystemExit ends the interpreter)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    os.close(_REPLIES)
    argv = request["argv"]
    code: int | str | None = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = request["cwd"]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # what the interpreter prints for an uncaught exception, and its exit code
        traceback.print_exc()
        code = 1
    raise SystemExit(code)


def serve() -> None:
    global _REPLIES
    _REPLIES = os.dup(1)  # the protocol gets its own fd; anything an import prints to stdout goes to stderr
    os.dup2(2, 1)
    _preload()
    _reply({"ready": os.getpid()})
    buffer = b""
    running: set[int] = set()
    while True:
        readable, _, _ = select.select([0], [], [], 0.02)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:  # the tests ended: stop at once (the server owns nothing to clean up; an imported
                os._exit(0)  # library's exit handlers could keep the interpreter up past the session's end)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request)
                running.add(pid)
                _reply({"id": request["id"], "pid": pid})
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                _reply({"pid": pid, "code": os.waitstatus_to_exitcode(status)})


# ---------------------------------------------------------------------------------------------------------- client
@dataclass
class Forked:
    """A forked process as the tests see it: ``poll``, ``wait``, ``kill``, like ``subprocess.Popen``."""

    pid: int
    server: ForkServer

    def poll(self) -> int | None:
        return self.server.codes.get(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        with self.server.changed:
            if not self.server.changed.wait_for(lambda: self.pid in self.server.codes, timeout):
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        return self.server.codes[self.pid]

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass


class ForkServer:
    """The client: starts the server with ``env`` and forks processes from it."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=cwd
        )
        self.codes: dict[int, int] = {}
        self.pids: dict[int, int] = {}
        self.changed = threading.Condition()
        self._next = 0
        self._lock = threading.Lock()
        ready = json.loads(self.proc.stdout.readline() or b"{}")
        if "ready" not in ready:
            raise RuntimeError(f"the tests' fork server did not start (exit {self.proc.wait()})")
        threading.Thread(target=self._read, daemon=True, name="fork-server-replies").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.changed:
                if "id" in message:
                    self.pids[message["id"]] = message["pid"]
                else:
                    self.codes[message["pid"]] = message["code"]
                self.changed.notify_all()

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path) -> Forked:
        """``argv`` is what follows ``python``: ``["-m", module, ...]`` or ``[script, ...]``."""
        with self._lock:
            self._next += 1
            ident = self._next
            request = {"id": ident, "argv": argv, "env": env, "cwd": str(cwd), "stdout": str(stdout),
                       "stderr": str(stderr)}  # fmt: skip
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        with self.changed:
            self.changed.wait_for(lambda: ident in self.pids or self.proc.poll() is not None)
        if ident not in self.pids:
            raise RuntimeError(f"the tests' fork server died (exit {self.proc.poll()})")
        return Forked(self.pids[ident], self)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    serve()
