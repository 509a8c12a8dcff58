"""The Llama pretraining trainer and what it needs at run time (preemption handling)."""
