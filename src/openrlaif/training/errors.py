"""How a training run stops: `TrainingError`, and `check_finite` for a non-finite quantity."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from openrlaif.errors import OpenRLAIFError


class TrainingError(OpenRLAIFError):
    """A run that cannot go on: a non-finite loss, too little data for the batch size, ..."""


def check_finite(
    step: int, name: str, value: float | torch.Tensor | None, last_checkpoint: Path | None
) -> None:
    """Stop on a non-finite quantity with one line naming the step; the last good checkpoint stays."""
    if value is None:
        return
    v = float(value)
    if math.isfinite(v):
        return
    if last_checkpoint is not None:
        hint = f"the last good checkpoint is {last_checkpoint}; lower learning_rate and resume with --resume"
    else:
        hint = "no checkpoint was written before it; lower learning_rate and start again"
    raise TrainingError(f"step {step}: {name} is {v} ({hint})")
