"""``megatron-adamc plan``: memory per GPU, fit, fix and time to train of a train config on given hardware.

``activations`` counts what autograd keeps (checked against torch's memory tracker), ``model_states`` what
DeepSpeed ZeRO allocates (checked against DeepSpeed's estimators), ``planner`` adds buffers and time, ``report``
prints it. Nothing here imports the trainer.
"""

from megatron_adamc.plan.planner import GiB, Hardware, Plan, plan_run, suggest_fix
from megatron_adamc.plan.report import format_plan, not_fit_line, plan_json

__all__ = ["GiB", "Hardware", "Plan", "format_plan", "not_fit_line", "plan_json", "plan_run", "suggest_fix"]
