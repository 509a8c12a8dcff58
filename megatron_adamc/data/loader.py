"""Micro batches assembled ahead of the training step by worker processes: torch's DataLoader over the sampler.

WHY: with ``collate`` on the training thread, every step waits while GPTDataset reads and stitches its samples.
Here ``num_workers`` processes build the next ``prefetch_factor`` micro batches each while the step runs, and a
receiver thread takes them in as they are done (pinning them, page-locked, on CUDA so that the copy to the GPU is
asynchronous): the training thread only picks up a ready batch. The batches are the synchronous path's, in the
same order: each "index" the DataLoader hands a worker is one micro batch's list from ``iter_batch_indices`` and
the worker calls the same ``collate``; the DataLoader returns results in sampler order. The data position stays
one integer, ``consumed_samples``: a loader started at a checkpoint's value yields what an uninterrupted run did.

Workers ignore SIGTERM, SIGUSR1 and SIGINT: Slurm signals every process of a job step, and the trainer's
preemption handler (in the parent) decides when to stop and then closes the loader; a worker killed by the signal
would instead crash the step. A worker whose parent dies (even by SIGKILL) ends within
moments: the kernel kills it (``PR_SET_PDEATHSIG``, see ``die_with_parent``; DataLoader's own watchdog only looks
between batches). An exception in a worker is raised in the parent by ``next``: a project error (a token id
outside the vocabulary) as its one line, anything else with the worker's traceback; a worker that dies is reported
there as an error, not a hang.
"""

from __future__ import annotations

import atexit
import functools
import queue
import signal
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils import signal_handling

from megatron_adamc.data.sampler import collate, iter_batch_indices
from megatron_adamc.errors import ConfigError, MegatronAdamCError


class _Batch:
    """One micro batch on its way from a worker: numpy arrays, which cross the process boundary pickled by value.

    WHY not tensors: torch hands a tensor over in shared memory, and the receiver must then get its file
    descriptor from the worker, which has to be scheduled again to send it: measured here (busy cores) 8 ms per
    batch against 1 ms for pickling the few hundred KB of a micro batch. On CUDA the receiver thread calls
    ``pin_memory``, so the page-locked copy is made off the training thread.
    """

    def __init__(self, tokens: Any, labels: Any) -> None:
        self.tokens, self.labels = tokens, labels

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.as_tensor(self.tokens), torch.as_tensor(self.labels)

    def pin_memory(self) -> _Batch:
        tokens, labels = self.tensors()
        return _Batch(tokens.pin_memory(), labels.pin_memory())


class _MicroBatches:
    """Dataset view whose item is one whole micro batch: ``view[indices] -> _Batch`` of ``collate``'s tensors."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: list[int]) -> _Batch:
        batch = collate(self.dataset, indices)
        return _Batch(batch["tokens"].numpy(), batch["labels"].numpy())


class _Receiver(threading.Thread):
    """Takes finished batches from the workers on a background thread (pinning them on CUDA) and keeps up to
    ``depth`` ready in an in-process queue.

    WHY: receiving a batch from a worker process is a pipe read of a few hundred KB that needs the worker's feeder
    thread scheduled in turn; on busy cores that took longer than GPTDataset's own assembly (2-6 ms against 2 ms
    measured here). Done here, the training thread only takes a ready batch. This is DataLoader's pin-memory
    thread, made independent of CUDA; an error (a worker's exception, a dead worker) is passed on to ``get``.
    """

    def __init__(self, batches: Iterator[_Batch], depth: int, device: torch.device) -> None:
        super().__init__(name="batch-receiver", daemon=True)
        self.batches: Iterator[_Batch] | None = batches
        self.device = device
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()

    def run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # pinning opens a context on the current device: this rank's
        try:
            while not self.stopping.is_set():
                batch = next(self.batches)
                self._put((batch.pin_memory() if self.device.type == "cuda" else batch, None))
        except BaseException as err:  # re-raised by get(), on the training thread
            self._put((None, err))

    def _put(self, item: tuple) -> None:
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> _Batch:
        while True:
            try:
                batch, err = self.ready.get(timeout=1.0)
            except queue.Empty:
                if self.is_alive():
                    continue
                try:
                    batch, err = self.ready.get_nowait()  # it has ended: its last word is in the queue
                except queue.Empty:
                    raise RuntimeError("BatchLoader has stopped: an earlier next() raised its error") from None
            if err is not None:
                raise _one_line(err)
            return batch

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)  # it finishes the batch it is receiving, if any
        self.batches = None  # the last reference to DataLoader's iterator: its workers shut down now


def _one_line(err: BaseException) -> BaseException:
    """A project error raised in a worker, as its own one line: DataLoader re-raises it in the parent with the
    worker's whole traceback as the message (``ExceptionWrapper``), which the CLI would print as is."""
    if not isinstance(err, MegatronAdamCError) or "Traceback" not in str(err):
        return err
    last = str(err).strip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    clean = type(err)(last.removeprefix(prefix))
    clean.__cause__ = None
    clean.__suppress_context__ = True
    return clean


def _ignore_stop_signals(worker_id: int) -> None:
    """Every worker's start: Slurm's stop signals ignored, and an end tied to its parent's (``die_with_parent``)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the thread that forked it ends (Linux ``PR_SET_PDEATHSIG``).

    WHY: a worker ignores SIGTERM (above), and DataLoader's own watchdog only looks for its parent between two
    batches: a worker blocked handing over a batch outlived a ``kill -9`` of the trainer for minutes (390 MB
    resident). The kernel's signal needs nothing from the worker. The parent may already be gone when this runs
    (killed between the fork and here): then the worker ends at once. Elsewhere than Linux, a no-op.
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)


def _close_at_exit(ref: weakref.ref) -> None:
    loader = ref()
    if loader is not None:
        loader.close()


class BatchLoader:
    """This rank's micro batches from ``start_consumed`` on, endless: ``tokens, labels = next(loader)``.

    ``num_workers=0`` assembles each batch in ``next`` (the synchronous path). ``num_samples`` (the dataset
    length) wraps indices around, as ``batch_indices`` does. ``consumed_samples`` is the position after the last
    batch returned, to checkpoint. Close it (or use ``with``) to stop the workers at once.
    """

    def __init__(
        self,
        dataset: Any,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        start_consumed: int = 0,
        num_workers: int = 1,
        prefetch_factor: int = 4,
        device: torch.device | str = "cpu",
        num_samples: int | None = None,
    ) -> None:
        if num_workers < 0 or prefetch_factor < 1:
            raise ConfigError(
                f"data.num_workers={num_workers} / data.prefetch_factor={prefetch_factor}: use >= 0 and >= 1"
            )
        self.device = torch.device(device)
        self.micro_batch, self.dp_size = micro_batch, dp_size
        self.consumed_samples = start_consumed
        indices = iter_batch_indices(start_consumed, micro_batch, dp_rank, dp_size, num_samples)
        workers: dict[str, Any] = {}
        if num_workers > 0:
            workers = dict(prefetch_factor=prefetch_factor, worker_init_fn=_ignore_stop_signals)
        self._loader = DataLoader(
            _MicroBatches(dataset),
            sampler=indices,  # each "index" is a whole micro batch; batch_size=None: no further batching
            batch_size=None,
            num_workers=num_workers,
            pin_memory=False,  # the receiver thread pins (with workers); the synchronous path copies as before
            **workers,
        )
        self._iterator: Any = iter(self._loader)
        self._workers_of: Any = self._iterator if num_workers > 0 else None  # kept until its workers have ended
        self._receiver: _Receiver | None = None
        if num_workers > 0:
            self._receiver = _Receiver(self._iterator, depth=2, device=self.device)
            self._iterator = None
            self._receiver.start()
        # Before multiprocessing's own exit hook (atexit runs last-in first-out), which would SIGTERM the workers
        # (ignored) and join them forever: a loader still referenced at interpreter exit is closed first.
        self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._receiver is not None:
            tokens, labels = self._receiver.get().tensors()
        elif self._iterator is not None:
            tokens, labels = next(self._iterator).tensors()  # the synchronous path: errors raise here as they are
        else:
            raise RuntimeError("BatchLoader is closed")
        self.consumed_samples += self.micro_batch * self.dp_size
        return tokens.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the workers now; idempotent, and safe to call again after an interrupted close.

        DataLoader's own shutdown asks each worker to end, joins it for 5 s, then sends SIGTERM, which the workers
        ignore; one still alive then would hang multiprocessing's exit hook (it joins its children forever). So a
        worker that has not ended by then is killed: a closed loader leaves no process behind, whatever happened
        (a second Ctrl-C in the middle of this included).
        """
        try:
            if self._receiver is not None:
                self._receiver.stop()
                self._receiver = None
            self._iterator = None
            if self._workers_of is not None:
                self._workers_of._shutdown_workers()
        finally:
            self._end_workers()
            atexit.unregister(self._at_exit)

    def _end_workers(self) -> None:
        it = self._workers_of
        if it is None:
            return
        if getattr(it, "_worker_pids_set", False):  # DataLoader's SIGCHLD check would call the kill a failure
            signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for worker in it._workers:
            if worker.is_alive():
                worker.kill()
            worker.join(timeout=5)
        self._workers_of = None

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
