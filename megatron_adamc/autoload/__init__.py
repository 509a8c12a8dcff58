"""``"type": "AdamC"`` from the DeepSpeed JSON alone: AdamC registers itself when DeepSpeed's engine is first imported.

An installed megatron-adamc puts two start-up files into site-packages (see ``build_backend/``):
``megatron_adamc_autoload.pth``, whose import line runs ``install()`` at every interpreter start-up up to Python 3.14,
and ``megatron_adamc_autoload.start``, the PEP 829 entry point that does the same from Python 3.15 on (there the
matching ``.start`` file switches the ``.pth`` import line off). Start-up runs before any user code, so the import order
of the script does not matter, and every process a launcher starts (the ``deepspeed`` launcher, torchrun,
``accelerate launch``, a container's entry point) is a new interpreter that runs it again.

This module imports nothing but ``sys`` and ``os`` (loaded before site-packages is read; not even ``typing``, which
would cost every Python process milliseconds). ``install()`` puts a finder at the front of ``sys.meta_path`` that
answers for one module name only, ``deepspeed.runtime.engine``. When that module has executed, the finder calls
``megatron_adamc.deepspeed.register()`` and removes itself. A process that never imports DeepSpeed pays one string
comparison per import (``benchmarks/autoload_startup.py`` measures it all).
``MEGATRON_ADAMC_AUTOLOAD=0`` turns the hook off; ``register()`` keeps working either way.
``python -m megatron_adamc.autoload`` says what is installed and whether it fired.
"""

# No ``from __future__ import annotations`` here: the __future__ module is one more import in every Python process.
import os
import sys

ENV_VAR = "MEGATRON_ADAMC_AUTOLOAD"
TRIGGER = "deepspeed.runtime.engine"  # defines DeepSpeedEngine, which register() patches
STARTUP_NAME = "megatron_adamc_autoload"  # the start-up files: STARTUP_NAME + ".pth" and + ".start"
_OFF = {"0", "false", "no", "off"}

# What this interpreter did: "off" (the variable), "waiting" (finder installed), "registered", or "failed: ...".
state = "not installed"
_finder = None  # the installed _EngineImportFinder, while it waits


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


class _RegisterAfterExec:
    """The real loader of ``deepspeed.runtime.engine``, plus register() once the module has executed."""

    def __init__(self, loader: object) -> None:
        self.loader = loader

    def create_module(self, spec: object) -> object:
        return self.loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # nothing downstream ever sees this wrapper
        self.loader.exec_module(module)
        _uninstall()
        _register()

    def __getattr__(self, name: str) -> object:
        return getattr(self.loader, name)


class _EngineImportFinder:
    """A meta-path finder that only wraps the loader the other finders return for ``deepspeed.runtime.engine``."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def _uninstall() -> None:
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None


def _register() -> None:
    """register(), but a DeepSpeed it cannot patch must not break ``import deepspeed`` for everyone else."""
    global state
    try:
        from megatron_adamc.deepspeed.engine_patch import register

        register()
        state = "registered"
    except Exception as err:  # noqa: BLE001 - reported, never raised into the user's import
        import warnings

        state = f"failed: {type(err).__name__}: {err}"
        warnings.warn(
            f"megatron-adamc: AdamC was not registered with DeepSpeed ({type(err).__name__}: {err}); "
            f"call megatron_adamc.deepspeed.register() to see why, or set {ENV_VAR}=0",
            RuntimeWarning,
            stacklevel=2,
        )


def install() -> None:
    """The start-up entry point (``.pth`` line and PEP 829 ``.start`` file). Idempotent; cheap; never raises."""
    global _finder, state
    if not enabled():
        state = "off"
        return
    if _finder is not None or state == "registered":
        return
    if TRIGGER in sys.modules:  # DeepSpeed came first (install() called late, by hand)
        _register()
        return
    _finder = _EngineImportFinder()
    sys.meta_path.insert(0, _finder)
    state = "waiting"


def startup_files() -> list[str]:
    """The start-up files of this package found in this interpreter's site directories."""
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    names = (f"{STARTUP_NAME}.pth", f"{STARTUP_NAME}.start")
    return [os.path.join(d, n) for d in dict.fromkeys(dirs) for n in names if os.path.isfile(os.path.join(d, n))]
