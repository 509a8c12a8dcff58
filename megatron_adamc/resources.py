"""Files the package ships beside its code: ``configs/`` (trainer YAML, DeepSpeed JSON, Megatron-LM argument files)
and ``launch/slurm/`` (the sbatch scripts and what they source).

WHY: an installed wheel has no source tree around it, so nothing may look for these relative to the repository. They
live inside the package (package data); the checkout's top-level ``configs`` and ``launch/slurm`` are symlinks into
it, so a checkout, an editable install and a wheel read the same files. Installs are plain files (never zipped), so
these are real paths that sbatch and bash can open.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """The shipped ``configs/`` (``train/``, ``deepspeed/``, ``megatron/``)."""
    return PACKAGE_DIR / "configs"


def launch_dir() -> Path:
    """The shipped Slurm scripts (``train.sbatch``, ``megatron.sbatch``, ``node.sh``, ``common.sh``, ``env.sh``)."""
    return PACKAGE_DIR / "launch" / "slurm"


def find_file(path: str | os.PathLike) -> Path:
    """``path`` as given (``~`` expanded) when it exists; else, for a checkout-relative ``configs/...`` path such as
    the default ``configs/deepspeed/zero1.json``, the shipped copy when there is one; else ``path`` unchanged.

    So the paths the README and the defaults use work from any directory, not only from a checkout's root.
    """
    given = Path(os.path.expanduser(path))
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts
    if len(parts) > 1 and parts[0] == "configs":
        shipped = configs_dir().joinpath(*parts[1:])
        if shipped.is_file():
            return shipped
    return given
