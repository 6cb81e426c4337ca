"""The learning-rate schedule shared by pretraining and LoRA training."""

from __future__ import annotations

import math


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LambdaLR factor: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
