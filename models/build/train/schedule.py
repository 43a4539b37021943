"""The learning-rate schedule shared by training and distillation."""

from __future__ import annotations

import math
from typing import Any


def lr_at(step: int, cfg: dict[str, Any]) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr``."""
    lr, min_lr, warm, total = cfg["lr"], cfg["min_lr"], cfg["warmup_steps"], cfg["steps"]
    if step < warm:
        return float(lr * (step + 1) / warm)
    progress = (step - warm) / max(1, total - warm)
    return float(min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress)))
