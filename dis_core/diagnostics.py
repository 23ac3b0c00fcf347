"""How well a target path fits the paper's assumption: targets that move monotonically to y*."""

from __future__ import annotations

import numpy as np
import torch

from dis_core.interfaces import IGNORE


def hamming_to_labels(frames: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """frames (B, N, L), labels (B, L) -> (B, N) cells, among those supervised by y*, where the
    frame differs from y*."""
    valid = (labels != IGNORE).unsqueeze(1)  # (B, 1, L)
    return ((frames != labels.unsqueeze(1)) & valid).sum(-1)


def target_report(frames: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-step mean Hamming distance of the targets to y*, and the share of examples whose
    distance never increases / strictly decreases at every step."""
    d = hamming_to_labels(frames, labels).to(torch.float64)  # (B, N)
    steps = d.diff(dim=1)
    out = {f"hamming@{s + 1}": float(d[:, s].mean()) for s in range(d.shape[1])}
    out["monotone_share"] = float((steps <= 0).all(1).to(torch.float64).mean()) if d.shape[1] > 1 else 1.0
    out["strict_share"] = float((steps < 0).all(1).to(torch.float64).mean()) if d.shape[1] > 1 else 1.0
    out["final_distance"] = float(d[:, -1].mean())
    return out


def sample_indices(size: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(size, size=min(k, size), replace=False))
