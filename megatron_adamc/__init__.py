"""megatron-adamc: schedule-corrected weight decay (AdamC) and stability tooling for LLM pretraining.

Layers point one way: ``core`` (the decay rule, the norm maths) imports neither DeepSpeed nor Megatron;
``deepspeed`` and ``megatron`` integrate it; the trainer and the CLI sit on top.
"""

__version__ = "0.1.0"
