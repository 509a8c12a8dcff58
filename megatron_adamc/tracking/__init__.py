"""Norm tracking on the partitioned FP32 master weights: per-layer norms against the theory, activations,
low-precision headroom and a spike alarm. See docs/tracking.md.
"""

from megatron_adamc.tracking.config import TrackingConfig
from megatron_adamc.tracking.sinks import tensorboard_tag, write_tensorboard
from megatron_adamc.tracking.tracker import Tracker

__all__ = ["Tracker", "TrackingConfig", "tensorboard_tag", "write_tensorboard"]
