"""The optional halves of the install: ``megatron-adamc[deepspeed]``, ``[megatron]``, and ``[train]`` (both: the
project's Llama trainer steps with DeepSpeed and reads megatron-core's indexed datasets).

Neither DeepSpeed nor megatron-core is a hard dependency (a Megatron cluster must not pull DeepSpeed, nor a DeepSpeed
one megatron-core). The module that needs one calls ``require`` first, so a missing half is one line naming the extra
to install, not a traceback from deep inside an import.
"""

from __future__ import annotations

import importlib.util

from megatron_adamc.errors import UserError

EXTRAS = ("deepspeed", "megatron", "train")
PACKAGES = {"deepspeed": "deepspeed", "megatron.core": "megatron-core"}  # module -> the distribution providing it


class MissingExtraError(UserError, ImportError):
    """A half of the package whose dependency is not installed (exit code 2 under the CLI)."""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or a module set to None in sys.modules
        return False


def require(module: str, extra: str, purpose: str) -> None:
    """Raise ``MissingExtraError`` unless ``module`` can be imported."""
    if not installed(module):
        raise MissingExtraError(
            f"{purpose} needs {PACKAGES.get(module, module)}, which is not installed: "
            f"pip install 'megatron-adamc[{extra}]'"
        )
