"""Stand-ins for the two GPU kernel libraries Megatron-Bridge imports at the top of its modules and that cannot run on a
CPU: Transformer Engine (no CPU build on the package index) and triton (its kernels need a GPU). Importing this module
makes ``import transformer_engine`` / ``import triton`` (whichever is missing) return empty modules whose every
attribute is an inert class, so Bridge's config and optimizer modules import; nothing of them is called by the code
under test (Bridge's config dataclasses, its override provider and ``_get_scheduler``). Used only by
tests/test_megatron_bridge.py, in its own interpreter.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# Only the ones missing here: where triton is installed (a GPU machine, or for Megatron-LM's own import), it is used.
NAMES = tuple(name for name in ("transformer_engine", "triton") if importlib.util.find_spec(name) is None)


class _Inert(type):
    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(name, (object,), {})


class _Module(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Inert(name, (object,), {})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname.split(".")[0] in NAMES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _Module(spec.name)
        module.__path__ = []
        module.__version__ = "2.10.0"
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


sys.meta_path.insert(0, _Finder())
