"""Stand-ins for the two GPU kernel libraries Megatron-Bridge imports at the top of its modules and that cannot run on a
CPU: Transformer Engine (no CPU build on the package index) and triton (its kernels need a GPU). Importing this module
makes ``import transformer_engine`` / ``import triton`` (whichever is missing) return empty modules whose every
attribute is an inert class, so Bridge's config and optimizer modules import; nothing of them is called by the code
under test (Bridge's config dataclasses, its override provider and ``_get_scheduler``). Used only by
tests/test_megatron_bridge.py, in its own interpreter, triton only after megatron-core is imported: megatron-core's
``torch.compile`` decorators make torch probe triton at import, and must find it missing (torch then skips it).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


def _inert_call(args: tuple, kwargs: dict) -> object:
    """A decorator use (``@triton.jit``) gives the function back; any other call an inert value."""
    if len(args) == 1 and not kwargs and callable(args[0]):
        return args[0]
    return _Value()


class _Value:
    def __call__(self, *args: object, **kwargs: object) -> object:
        return _inert_call(args, kwargs)

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Value()


class _Inert(type):
    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(name, (object,), {})

    def __call__(cls, *args: object, **kwargs: object) -> object:
        return _inert_call(args, kwargs)


class _Module(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Inert(name, (object,), {})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _Module(spec.name)
        module.__path__ = []
        module.__version__ = "2.10.0"
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def stand_in(*names: str) -> None:
    """Stand in for those of ``names`` that are not installed (an installed one, e.g. triton here, is used)."""
    missing = tuple(name for name in names if importlib.util.find_spec(name) is None)
    if missing:
        sys.meta_path.insert(0, _Finder(missing))
