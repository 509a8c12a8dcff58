"""Finding a Megatron-LM checkout: it is not on the package index, so it comes from the environment.

Looked for, in order: ``$MEGATRON_LM_PATH``, then every ``sys.path`` entry (``PYTHONPATH``, or an editable
install of the repository). A checkout is a folder holding ``pretrain_gpt.py`` and ``megatron/training``.
Nothing here imports Megatron, so a missing checkout is reported in one line before any heavy import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MEGATRON_LM_PATH_ENV = "MEGATRON_LM_PATH"
# The newest Megatron-LM release for Python 3.11 (0.17 and later need 3.12); matches constraints.txt.
MEGATRON_LM_TAG = "core_v0.16.1"
HOW_TO_GET = (
    f"git clone --branch {MEGATRON_LM_TAG} https://github.com/NVIDIA/Megatron-LM and set {MEGATRON_LM_PATH_ENV} "
    "to it, or run inside the project's GPU Docker image, which has it"
)


class PluginError(RuntimeError):
    """Megatron-LM cannot take the plugin (not importable, or a release without the names it patches): one line,
    exit code 2."""


class MegatronLMNotFound(RuntimeError):
    """Megatron-LM is missing or the path given is not a checkout; the message is one line with the fix."""


def is_checkout(path: Path) -> bool:
    return (path / "pretrain_gpt.py").is_file() and (path / "megatron" / "training").is_dir()


def locate_megatron_lm() -> Path:
    """The Megatron-LM checkout to run; ``$MEGATRON_LM_PATH`` wins and must be right when set."""
    configured = os.environ.get(MEGATRON_LM_PATH_ENV)
    if configured:
        root = Path(configured).expanduser().resolve()
        if not is_checkout(root):
            raise MegatronLMNotFound(
                f"{MEGATRON_LM_PATH_ENV}={configured} is not a Megatron-LM checkout (no pretrain_gpt.py and "
                f"megatron/training there): point it at the repository root, e.g. {HOW_TO_GET}"
            )
        return root
    for entry in sys.path:
        root = Path(entry or ".").resolve()
        if is_checkout(root):
            return root
    raise MegatronLMNotFound(
        f"Megatron-LM not found ({MEGATRON_LM_PATH_ENV} unset and no checkout on PYTHONPATH): {HOW_TO_GET}"
    )
