"""Will this run fit THIS machine? The planner's answer, asked by the trainer's preflight before anything allocates.

WHY: a size that cannot fit (``train.seq_len`` 1e9, a micro batch of 1e5, a 1e6 vocabulary, ``train.steps`` 1e9)
used to end in an allocator traceback (or the kernel's OOM killer) after minutes of start-up. The planner already
knows every term; here it is given this machine: each local GPU's memory, or on a CPU run the host's memory
shared by the local ranks. One more term lives on the host whatever the device: megatron-core's sample indices,
which it builds in memory for every sample the run will draw (``train.steps`` x the global batch, plus the
validation passes), ~24 bytes a sample plus ~20 bytes per document per epoch (``data_index_bytes``).

The planner's total is an upper bound (docs/plan.md), so a run refused here would not have fitted; a run that
passes may still be tight.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_adamc.errors import ConfigError
from megatron_adamc.plan.planner import CUDA_CONTEXT_GIB, GiB, Hardware, Plan, plan_run
from megatron_adamc.plan.report import not_fit_line

# megatron-core GPTDataset: sample index (2 x int64 per sample) + shuffle index (int64) ...
INDEX_BYTES_PER_SAMPLE = 24
# ... and the document index: numpy.mgrid's int64 pair (16 B) then the int32 copy (4 B) per document per epoch.
INDEX_BYTES_PER_DOCUMENT_EPOCH = 20
# A document length to assume when the data is not built yet (the default corpus before its first run).
ASSUMED_DOCUMENT_TOKENS = 512


@dataclass(frozen=True)
class HostMemory:
    total_bytes: int
    source: str  # "MemTotal" or the cgroup limit that is lower


def host_memory() -> HostMemory:
    """The memory this process may use: the machine's, or its cgroup limit when lower (containers, Slurm)."""
    total = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    best = HostMemory(total, "MemTotal")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and 0 < int(limit) < best.total_bytes:
            best = HostMemory(int(limit), f"the cgroup limit {path}")
    return best


def data_index_bytes(samples: int, seq_len: int, documents: int, tokens_per_epoch: int) -> int:
    """Host bytes megatron-core's index build holds for ``samples`` samples of ``seq_len`` tokens over data of
    ``documents`` documents and ``tokens_per_epoch`` tokens (its epochs repeat the documents)."""
    epochs = max(1, math.ceil(samples * seq_len / max(1, tokens_per_epoch)))
    return INDEX_BYTES_PER_SAMPLE * (samples + 1) + INDEX_BYTES_PER_DOCUMENT_EPOCH * epochs * max(1, documents)


def data_shape(config: Any) -> tuple[int, int]:
    """(documents, tokens) of the training data as far as it exists now; an assumption for data not built yet."""
    from megatron_adamc.data.validate import check_indexed_files

    data = config.data
    if data.default_corpus:
        prefixes = [os.path.join(os.path.expanduser(data.cache_dir), "train")]
    else:
        from megatron_adamc.data.blend import parse_blend

        prefixes = list(parse_blend(data.train, "data.train")[0])
    documents = tokens = 0
    for prefix in prefixes:
        if not (os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")):
            return 0, 0
        files = check_indexed_files(prefix, "data.train")
        documents, tokens = documents + files.documents, tokens + files.tokens
    return documents, tokens


def check_fits_here(config: Any, world_size: int, local_world_size: int) -> None:
    """Refuse (ConfigError, the planner's one line) a run that cannot fit this machine's GPU or host memory."""
    import torch

    tc = config.train
    global_batch = tc.micro_batch_size * tc.grad_accum * world_size
    samples = tc.steps * global_batch + config.eval.batches * tc.micro_batch_size * world_size
    documents, tokens = data_shape(config)
    if documents == 0:  # not built yet: assume documents of ASSUMED_DOCUMENT_TOKENS
        tokens = max(1, samples * tc.seq_len)
        documents = max(1, tokens // ASSUMED_DOCUMENT_TOKENS)
    index = data_index_bytes(samples, tc.seq_len, documents, tokens)
    host = host_memory()
    nodes = max(1, world_size // max(1, local_world_size))
    if torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(0).total_memory / GiB
        plan = plan_run(config, Hardware(nodes, local_world_size, gib))
        if not plan.fits:
            raise ConfigError(f"the run cannot fit this machine's GPUs: {not_fit_line(plan)}")
        if index > host.total_bytes:
            raise ConfigError(_index_line(index, host, samples, tc))
        return
    # CPU: every local rank holds its states and activations in host memory, beside the data index. The planner's
    # per-GPU budget is what one rank may use, plus the CUDA context and slack it adds for a GPU (absent here).
    per_rank = (host.total_bytes - index) / max(1, local_world_size)
    if per_rank <= 0:
        raise ConfigError(_index_line(index, host, samples, tc))
    budget = per_rank / GiB + CUDA_CONTEXT_GIB
    plan = plan_run(config, Hardware(nodes, local_world_size, budget))
    if not _fits_cpu(plan):
        held = _cpu_bytes(plan)
        ranks = f" x {local_world_size} ranks" if local_world_size > 1 else ""
        line = not_fit_line(plan).split("; fix: ", 1)[-1]
        raise ConfigError(
            f"the run cannot fit this machine's memory: {held / GiB:.1f} GiB per rank{ranks} + data index "
            f"{index / GiB:.1f} GiB > {host.total_bytes / GiB:.1f} GiB ({host.source}); largest term "
            f"{plan.largest_term} {plan.per_gpu_bytes[plan.largest_term] / GiB:.1f} GiB; fix: {line}"
        )


def _cpu_bytes(plan: Plan) -> float:
    """What one CPU rank holds: the planner's total without the CUDA context."""
    return plan.per_gpu_bytes["total"] - CUDA_CONTEXT_GIB * GiB


def _fits_cpu(plan: Plan) -> bool:
    return _cpu_bytes(plan) <= (plan.hardware.gpu_memory_gib - CUDA_CONTEXT_GIB) * GiB


def _index_line(index: int, host: HostMemory, samples: int, tc: Any) -> str:
    room = max(1, int(host.total_bytes * 0.5 / INDEX_BYTES_PER_SAMPLE))
    steps = max(1, tc.steps * room // max(1, samples))
    return (
        f"the run cannot fit this machine's memory: megatron-core's sample index for {samples:,} samples "
        f"(train.steps={tc.steps} x the global batch, plus validation) needs {index / GiB:.1f} GiB > "
        f"{host.total_bytes / GiB:.1f} GiB ({host.source}); fix: lower train.steps (e.g. {steps:,}) and extend "
        "the run later"
    )
