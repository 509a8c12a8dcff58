"""AdamC with no code line: registered with DeepSpeed, and with Megatron-LM / Megatron-Bridge, on their first import.

An installed megatron-adamc puts two start-up files into site-packages (see ``build_backend/``):
``megatron_adamc_autoload.pth``, whose import line runs ``install()`` at every interpreter start-up up to Python 3.14,
and ``megatron_adamc_autoload.start``, the PEP 829 entry point that does the same from Python 3.15 on (there the
matching ``.start`` file switches the ``.pth`` import line off). Start-up runs before any user code, so the import order
of the script does not matter, and every process a launcher starts (the ``deepspeed`` launcher, torchrun,
``accelerate launch``, a container's entry point) is a new interpreter that runs it again.

This module imports nothing but ``sys`` and ``os`` (loaded before site-packages is read; not even ``typing``, which
would cost every Python process milliseconds). ``install()`` puts a finder at the front of ``sys.meta_path`` that
``install()`` puts one finder per trigger module (``TRIGGERS``) at the front of ``sys.meta_path``, each answering for
its one name: when ``deepspeed.runtime.engine`` has executed, ``megatron_adamc.deepspeed.register()`` (``"type":
"AdamC"`` in the DeepSpeed JSON); when Megatron-LM's ``megatron.training`` package has,
``megatron_adamc.megatron.plugin.install()`` (``--adamc`` and its flags in Megatron's own parser: ``pretrain_gpt.py``,
``pretrain_mamba.py``, any script on ``megatron.training``); when Megatron-Bridge's ``megatron.bridge.training.optim``
has, ``megatron_adamc.megatron.bridge.install()``. Each finder removes itself once it fired. A process that imports
none of them pays three string comparisons per import (``benchmarks/autoload_startup.py`` measures it all).
``MEGATRON_ADAMC_AUTOLOAD=0`` turns the hook off (Megatron-LM then has no ``--adamc``); ``register()`` and
``plugin.install()`` keep working by hand either way.
``python -m megatron_adamc.autoload`` says what is installed and whether it fired.
"""

# No ``from __future__ import annotations`` here: the __future__ module is one more import in every Python process.
import os
import sys

ENV_VAR = "MEGATRON_ADAMC_AUTOLOAD"
TRIGGER = "deepspeed.runtime.engine"  # defines DeepSpeedEngine, which register() patches
# Module executed -> (integration module, its function, what it does): called right after that module has executed.
TRIGGERS = {
    TRIGGER: ("megatron_adamc.deepspeed.engine_patch", "register", "AdamC was not registered with DeepSpeed"),
    "megatron.training": ("megatron_adamc.megatron.plugin", "install", "Megatron-LM did not get --adamc"),
    "megatron.bridge.training.optim": (
        "megatron_adamc.megatron.bridge",
        "install",
        "Megatron-Bridge did not get AdamC's scheduler",
    ),
}
STARTUP_NAME = "megatron_adamc_autoload"  # the start-up files: STARTUP_NAME + ".pth" and + ".start"
_OFF = {"0", "false", "no", "off"}

# What this interpreter did for DeepSpeed: "off" (the variable), "waiting" (finder installed), "registered", or
# "failed: ..."; per trigger in ``states`` (Megatron-LM, Megatron-Bridge).
state = "not installed"
states = {}
_finders = {}  # trigger -> its installed finder, while it waits


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


class _CallAfterExec:
    """The real loader of a trigger module, plus its integration's call once the module has executed."""

    def __init__(self, loader: object, name: str) -> None:
        self.loader = loader
        self.name = name

    def create_module(self, spec: object) -> object:
        return self.loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # nothing downstream ever sees this wrapper
        self.loader.exec_module(module)
        _fired(self.name)

    def __getattr__(self, name: str) -> object:
        return getattr(self.loader, name)


class _ImportFinder:
    """A meta-path finder that only wraps the loader the other finders return for its one trigger module."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CallAfterExec(spec.loader, fullname)
                return spec
        return None


class _EngineImportFinder(_ImportFinder):
    """DeepSpeed's (``deepspeed.runtime.engine``)."""


def _remove(name: str) -> None:
    finder = _finders.pop(name, None)
    if finder is not None and finder in sys.meta_path:
        sys.meta_path.remove(finder)


def _fired(name: str) -> None:
    _remove(name)
    _call(name)


def _uninstall() -> None:
    for name in list(_finders):
        _remove(name)


def _call(name: str) -> None:
    """The trigger's integration; a framework it cannot patch must not break the user's import of it."""
    global state
    module_name, function, failure = TRIGGERS[name]
    try:
        if name != TRIGGER and not _is_megatron_lm(name):
            states[name] = "skipped: not Megatron-LM's megatron.training"
            return
        module = __import__(module_name, fromlist=[function])  # noqa: F841 - the integration, imported late
        getattr(module, function)()
        states[name] = "installed"
        if name == TRIGGER:
            state = "registered"
    except Exception as err:  # noqa: BLE001 - reported, never raised into the user's import
        import warnings

        states[name] = f"failed: {type(err).__name__}: {err}"
        if name == TRIGGER:
            state = states[name]
        warnings.warn(
            f"megatron-adamc: {failure} ({type(err).__name__}: {err}); call {module_name}.{function}() to see "
            f"why, or set {ENV_VAR}=0",
            RuntimeWarning,
            stacklevel=2,
        )


def _is_megatron_lm(name: str) -> bool:
    """megatron.training is Megatron-LM's (it holds training.py and arguments.py), not some other package's."""
    if name != "megatron.training":
        return True
    module = sys.modules.get(name)
    return module is not None and "megatron.training.training" in sys.modules


def _register() -> None:
    _call(TRIGGER)


def install() -> None:
    """The start-up entry point (``.pth`` line and PEP 829 ``.start`` file). Idempotent; cheap; never raises."""
    global state
    if not enabled():
        state = "off"
        return
    for name in TRIGGERS:
        if name in _finders or name in states:
            continue
        if name in sys.modules:  # the framework came first (install() called late, by hand)
            _call(name)
            continue
        _finders[name] = (_EngineImportFinder if name == TRIGGER else _ImportFinder)(name)
        sys.meta_path.insert(0, _finders[name])
        if name == TRIGGER:
            state = "waiting"


def startup_files() -> list[str]:
    """The start-up files of this package found in this interpreter's site directories."""
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    names = (f"{STARTUP_NAME}.pth", f"{STARTUP_NAME}.start")
    return [os.path.join(d, n) for d in dict.fromkeys(dirs) for n in names if os.path.isfile(os.path.join(d, n))]
