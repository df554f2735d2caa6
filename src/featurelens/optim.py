"""Learning-rate schedules stepped every batch (``interval: step`` in ``conf/scheduler/*.yaml``)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, *, total_steps: int, max_epochs: int, warmup_epochs: float = 0.0,
                  final_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up from ~0 to the base lr over ``warmup_epochs``, then cosine decay to
    ``final_lr_ratio`` × the base lr at the last of ``total_steps`` optimiser steps (``max_epochs`` epochs)."""
    warmup = round(total_steps * min(max(warmup_epochs, 0.0), max_epochs) / max_epochs)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
