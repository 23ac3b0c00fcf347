"""Token losses. Both return a per-sequence mean over supervised cells: (B,) fp32.

The reference sums the per-sequence means over the batch and divides by the global batch;
the trainer does that division (see trainer.py), so these stay per-example.
"""

from __future__ import annotations

import torch


def _stablemax_log_probs(logits: torch.Tensor) -> torch.Tensor:
    # s(v) = v + 1 for v >= 0, 1 / (1 - v) for v < 0: a softmax replacement that does not
    # saturate (TRM's "stablemax"); computed in float64 as the reference does.
    x = logits.to(torch.float64)
    s = torch.where(x >= 0, x + 1, 1.0 / (1.0 - x + 1e-30))
    return torch.log(s / s.sum(dim=-1, keepdim=True))


def per_sequence_ce(logits: torch.Tensor, targets: torch.Tensor, kind: str = "stablemax") -> torch.Tensor:
    """logits (B, L, V), targets (B, L) int64 with IGNORE (or any id outside [0, V)) skipped
    -> (B,) fp32 mean CE over each sequence's supervised cells (0 where none)."""
    vocab = logits.shape[-1]
    valid = (targets >= 0) & (targets < vocab)  # (B, L)
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    if kind == "stablemax":
        logp = _stablemax_log_probs(logits)
    elif kind == "softmax":
        logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, L)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    count = valid.sum(-1).clamp_min(1)
    return (nll.sum(-1) / count).to(torch.float32)
