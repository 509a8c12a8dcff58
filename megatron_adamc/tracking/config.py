"""The ``tracking`` section of a run config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrackingConfig(BaseModel):
    """What the norm tracker measures and how often. Unknown keys are errors (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    interval: int = Field(10, gt=0, description="track every N optimizer steps (step % interval == 0)")
    activations: bool = Field(True, description="RMS of qkv/proj/fc1/fc2 outputs and the max attention logit")
    max_logit_sequences: int = Field(
        1, ge=0, description="max attention logit over the first N sequences of each micro-batch per rank; 0: all"
    )
    low_precision: bool = Field(False, description="bf16 stale-update fraction and the FP8 delayed-scaling simulation")
    fp8_amax_history: int = Field(16, gt=0, description="amax history length, in logged steps, of the FP8 scales")
    spike_window: int = Field(100, gt=1, description="steps of loss / grad-norm history behind the z-scores")
    spike_zscore: float = Field(6.0, gt=0, description="a z-score above this is a spike event")
