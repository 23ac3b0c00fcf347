"""The learning-rate schedule: linear warm-up, then constant or cosine (the reference's)."""

from __future__ import annotations

import math


def lr_at(t: int, base: float, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """The rate at optimizer step t, counted from 1 (the first step gets base / warmup)."""
    if t < warmup:
        return base * t / warmup
    if decay == "constant":
        return base
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, base_lrs: list[float], t: int, schedule, total: int) -> float:
    """Write step t's rates into the optimizer's groups; returns the schedule's scale
    (1.0 after warm-up), which the puzzle table's own rate follows too."""
    scale = lr_at(t, 1.0, schedule.warmup_steps, total, schedule.decay, schedule.min_lr_ratio)
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * scale
    return scale
