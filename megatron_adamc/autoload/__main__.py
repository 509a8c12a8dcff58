"""``python -m megatron_adamc.autoload``: are the start-up files installed, is the hook on, did it fire here?

``python -m megatron_adamc.autoload run SCRIPT [ARGS...]`` runs an unmodified script (Megatron-LM's
``pretrain_gpt.py``, a DeepSpeed script) with the hook installed first: what the start-up files do in an installed
package, for a copy that is only on PYTHONPATH (``pip install --target``, a source tree), where no ``.pth`` file runs.
"""

from __future__ import annotations

import os
import runpy
import sys

import megatron_adamc.autoload as hook


def status() -> None:
    files = hook.startup_files()
    print(f"start-up files: {', '.join(files) or 'none (pip install megatron-adamc; or call register())'}")
    print(f"{hook.ENV_VAR}: {os.environ.get(hook.ENV_VAR, '(unset)')} -> {'on' if hook.enabled() else 'off'}")
    print(f"this interpreter: {hook.state}; {hook.states or 'no Megatron trigger fired'}")
    if hook.state == "waiting":
        import deepspeed  # noqa: F401 - fires the hook

        print(f"after import deepspeed: {hook.state}")


def run(argv: list[str]) -> None:
    if not argv or not os.path.isfile(argv[0]):
        print(f"python -m megatron_adamc.autoload run: error: give a script to run (got {argv[:1]})", file=sys.stderr)
        sys.exit(2)
    hook.install()
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python SCRIPT` puts the script's folder first
    runpy.run_path(argv[0], run_name="__main__")


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        run(sys.argv[2:])
    else:
        status()


if __name__ == "__main__":
    main()
