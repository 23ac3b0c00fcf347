"""How well a target path fits the paper's assumption (targets that move monotonically to y*),
and what an evaluation's rollouts spent and how their steps moved towards y* (the
`diagnostics/*` metrics: steps and network calls per example, the Advantage Margin per step)."""

from __future__ import annotations

import numpy as np
import torch

from dis_core.contract.interfaces import IGNORE
from dis_core.contract.metrics import Tally


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


class RolloutDiagnostics:
    """Accumulates `supervision.Rollout`s of one evaluation (per rank; `state` is gathered and
    `compute` merges): the mean steps and network calls an example got, and, when the rollouts
    carry it, the Advantage Margin (paper Prop. 4.1) per step: its mean over the supervised cells
    of the examples that ran step s (`advantage_margin@s`), the shares of those cells where it is
    positive or negative (`margin_positive@s`, `margin_negative@s`: beyond
    `supervision.MARGIN_TOL`; the rest are cells the model is already sure of), and all three
    over every step run (no `@s`)."""

    def __init__(self, calls_per_step: int | None):
        self.calls_per_step = calls_per_step
        self.tally = Tally("count", "steps")

    def update(self, out, n_real: int) -> None:
        steps = out.steps[:n_real].cpu()
        self.tally.add(count=n_real, steps=int(steps.sum()))
        if out.margin is not None:
            ran = (torch.arange(out.margin.shape[1])[None, :] < steps[:, None]).long()  # (B, N)
            cells = out.cells[:n_real].cpu()[:, None] * ran
            self.tally.add(margin_sum=out.margin[:n_real].cpu().double().sum(0), margin_pos=out.margin_positive[:n_real].cpu().sum(0),
                           margin_neg=out.margin_negative[:n_real].cpu().sum(0), margin_cells=cells.sum(0))

    def state(self) -> dict:
        return self.tally.state()

    def compute(self, states: list[dict]) -> dict[str, float]:
        t = Tally.merged(states)
        if not t["count"]:
            return {}
        out = {"mean_steps": t.ratio("steps", "count")}
        if self.calls_per_step:
            out["calls_per_example"] = out["mean_steps"] * self.calls_per_step
        if t["margin_cells"]:
            out.update(t.per_step("advantage_margin", "margin_sum", "margin_cells"))
            out.update(t.per_step("margin_positive", "margin_pos", "margin_cells"))
            out.update(t.per_step("margin_negative", "margin_neg", "margin_cells"))
            cells = sum(t["margin_cells"])
            if cells:
                out["advantage_margin"] = sum(t["margin_sum"]) / cells
                out["margin_positive"] = sum(t["margin_pos"]) / cells
                out["margin_negative"] = sum(t["margin_neg"]) / cells
        return out
