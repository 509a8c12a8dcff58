"""What the experiments' fork server imports once, so that every trainer run forked from it starts at its first
line of work: the trainer, DeepSpeed and megatron-core's dataset code (~10 s of a fresh interpreter).

Importing initializes nothing a run owns (no process group, RNG draw, CUDA context or thread). The import-time
notices (DeepSpeed's accelerator line, megatron-core's Transformer Engine/Apex warnings) are silenced at the file
descriptors, not by swapping ``sys.stdout``: loggers keep the stream objects they were made with, and a run's output
must still reach its train.log.
"""

from __future__ import annotations

import os
import sys
import warnings


def _preload() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import deepspeed  # noqa: F401
            import megatron.core.datasets.blended_megatron_dataset_builder  # noqa: F401
            import megatron.core.datasets.gpt_dataset  # noqa: F401

            import megatron_adamc.config.train  # noqa: F401
            import megatron_adamc.train.build  # noqa: F401
            import megatron_adamc.train.trainer  # noqa: F401
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


_preload()
