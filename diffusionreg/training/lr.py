"""Learning-rate factors (multipliers of the configured rate, for ``torch.optim.lr_scheduler.LambdaLR``)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 0 at ``total`` steps:
    ``min((step + 1) / warmup, 1/2 (1 + cos(pi (step - warmup) / (total - warmup))))``."""
    warm = (step + 1) / max(warmup, 1)
    if total <= warmup:
        return min(warm, 1.0)
    cos = 0.5 * (1 + math.cos(math.pi * min(max(step - warmup, 0), total - warmup) / (total - warmup)))
    return min(warm, cos)
