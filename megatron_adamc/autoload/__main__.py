"""``python -m megatron_adamc.autoload``: are the start-up files installed, is the hook on, did it fire here?"""

from __future__ import annotations

import os

import megatron_adamc.autoload as hook


def main() -> None:
    files = hook.startup_files()
    print(f"start-up files: {', '.join(files) or 'none (pip install megatron-adamc; or call register())'}")
    print(f"{hook.ENV_VAR}: {os.environ.get(hook.ENV_VAR, '(unset)')} -> {'on' if hook.enabled() else 'off'}")
    print(f"this interpreter: {hook.state}")
    if hook.state == "waiting":
        import deepspeed  # noqa: F401 - fires the hook

        print(f"after import deepspeed: {hook.state}")


if __name__ == "__main__":
    main()
