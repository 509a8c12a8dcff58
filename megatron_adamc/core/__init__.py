"""The pure core: the AdamC decay rule and the steady-state norm theory (no DeepSpeed, no Megatron)."""

from megatron_adamc.core.decay import AdamCError, corrected_weight_decay, validate_lr_max, validate_weight_decay

__all__ = ["AdamCError", "corrected_weight_decay", "validate_lr_max", "validate_weight_decay"]
