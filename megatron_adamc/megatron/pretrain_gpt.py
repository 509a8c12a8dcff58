"""An alternative entry point: ``python -m megatron_adamc.megatron.pretrain_gpt <pretrain_gpt.py's args>``.

An installed megatron-adamc already gives every unmodified Megatron-LM script ``--adamc`` (``plugin.py``, through
the start-up hook); this wrapper is for where that hook cannot run (``python -S``, a copy only on PYTHONPATH): it
finds Megatron-LM (``$MEGATRON_LM_PATH``), installs the plugin by hand, expands ``@file`` arguments (shell quoting,
``#`` comments: ``configs/megatron/*.args``) and runs Megatron-LM's own ``pretrain_gpt.py`` unchanged.
"""

from __future__ import annotations

import runpy
import shlex
import sys
from collections.abc import Sequence

from megatron_adamc.megatron.megatron_lm import MegatronLMNotFound, PluginError, locate_megatron_lm
from megatron_adamc.resources import find_file

PROG = "megatron_adamc.megatron.pretrain_gpt"


def expand_arg_files(argv: Sequence[str]) -> list[str]:
    """Replace each ``@path`` by the flags in that file (shell quoting, ``#`` comments)."""
    expanded: list[str] = []
    for arg in argv:
        if not arg.startswith("@"):
            expanded.append(arg)
            continue
        path = find_file(arg[1:])  # a configs/megatron/*.args path also finds the shipped copy
        if not path.is_file():
            raise PluginError(f"argument file {arg}: {path} does not exist; give the path of a configs/megatron/*.args")
        expanded.extend(shlex.split(path.read_text(), comments=True))
    return expanded


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = expand_arg_files(argv)
        root = locate_megatron_lm()
        sys.path.insert(0, str(root))  # before any megatron import: its megatron.core must win over the wheel's
        try:
            from megatron_adamc.megatron.plugin import install

            install()
        except ImportError as err:
            raise PluginError(
                f"Megatron-LM at {root} cannot be imported ({err}): install its requirements in this environment"
            ) from err
    except (PluginError, MegatronLMNotFound) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    script = root / "pretrain_gpt.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
