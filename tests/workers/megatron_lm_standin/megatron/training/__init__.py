"""A stand-in for Megatron-LM's ``megatron.training`` (not on the package index, so absent from CI): only the call
structure the plugin relies on, each name looked up at call time as in Megatron-LM core_v0.16.1 (arguments.py:
``parse_args`` -> ``add_megatron_arguments``; training.py: ``setup_model_and_optimizer`` ->
``get_megatron_optimizer_config`` / ``get_optimizer_param_scheduler``, ``train`` -> ``train_step``). The real
Megatron-LM runs the same tests where MEGATRON_LM_PATH points at a checkout (tests/test_megatron_plugin.py)."""

from .global_vars import get_args
from .training import pretrain

__all__ = ["get_args", "pretrain"]
