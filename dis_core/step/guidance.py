"""The paper's analysis of a recursive step, measured during the evaluation rollout
(`dis_core.step.supervision.rollout`); training never computes any of it.

Guidance (DIS paper Eq. 5): a step gives two readouts of the answer state, l_u = f_O(y before
the step's reasoning) and l_c = f_O(y after it) (the plain logits), and the step's answer is the
argmax of l_w = (1 - w) l_u + w l_c; w = 1 is the plain answer. The Advantage Margin
(Prop. 4.1): with delta = l_c - l_u and pi_w = softmax(l_w), delta[y*] - E_{a ~ pi_w} delta[a]
per cell, positive exactly when more guidance helps the right answer. `Answer` is what a halting
strategy with `uses_answer` sees of each step at evaluation (`fixed`'s `eval_halt`).

Which y is "before the reasoning" is the readout (docs/concepts.md#guidance-and-the-advantage-margin):
  "step"   y as the step received it: l_u of step s is l_c of step s-1 (one extra f_O call, for
           step 1); needs the backbone's `decode` (`StepReadout`)
  "cycle"  y just before the step's last y-update; needs `forward_readouts` (`CycleReadout`)
"""

from __future__ import annotations

import attrs
import torch

from dis_core.contract.interfaces import IGNORE, CycleReadout, StepReadout

READOUTS = ("step", "cycle")
# A cell's margin counts as positive (negative) above MARGIN_TOL (below -MARGIN_TOL). Cells the
# model is already sure of have a margin of 0 up to rounding (1 - pi_w(y*) underflows), whose
# sign would be noise; the margin is computed in float64, so 1e-6 is far above that noise.
MARGIN_TOL = 1e-6


@attrs.frozen
class Answer:
    """What a halting strategy with `uses_answer = True` sees at evaluation, after each step
    (`halt(..., answer=Answer)`): the step's (guided) logits and two signals computed from them."""

    logits: torch.Tensor  # (B, L, V) the logits the step's answer is the argmax of (l_w)
    confidence: torch.Tensor  # (B,) fp32 mean over the L positions of the top class's probability
    unchanged: torch.Tensor  # (B,) int64 steps in a row the argmax has not changed (0 at step 1)

    @classmethod
    def of(cls, l_w: torch.Tensor, loss: str, unchanged: torch.Tensor) -> "Answer":
        """`loss` is `supervision.loss`: the confidence is read in the distribution the model
        was trained to put on its logits."""
        return cls(logits=l_w, confidence=probabilities(l_w, loss).amax(-1).mean(-1), unchanged=unchanged)


def probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The distribution the model was trained to put on its logits: stablemax or softmax (fp32)."""
    if kind == "stablemax":
        x = logits.to(torch.float64)
        s = torch.where(x >= 0, x + 1, 1.0 / (1.0 - x + 1e-30))
        return (s / s.sum(-1, keepdim=True)).to(torch.float32)
    return torch.softmax(logits.float(), -1)


def advantage_margin(l_u: torch.Tensor, l_c: torch.Tensor, l_w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Paper Prop. 4.1 per cell: with delta = l_c - l_u and pi_w = softmax(l_w),
    delta[y*] - E_{a ~ pi_w} delta[a]. (B, L, V) logits, labels (B, L) -> (B, L); the value
    at an unsupervised cell (label IGNORE) is meaningless: mask it. Computed in float64 (whatever
    the logits' dtype) and returned as such."""
    delta = l_c.double() - l_u.double()
    pi = torch.softmax(l_w.double(), -1)
    safe = labels.clamp(0, delta.shape[-1] - 1)
    return delta.gather(-1, safe[..., None]).squeeze(-1) - (pi * delta).sum(-1)


def check_readouts(backbone, readout: str) -> None:
    """Raise ValueError unless the backbone offers what `readout` needs."""
    need = {"step": ("decode", StepReadout), "cycle": ("forward_readouts", CycleReadout)}.get(readout)
    if need is None:
        raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    name, capability = need
    if not isinstance(backbone, capability):
        raise ValueError(f"readout {readout!r} needs the backbone's `{name}` (guidance and the Advantage Margin); "
                         f"{type(backbone).__name__} has none")


def has_readouts(backbone, readout: str) -> bool:
    """Whether the backbone offers what `readout` needs (trm and hrm offer both)."""
    try:
        check_readouts(backbone, readout)
    except ValueError:
        return False
    return True


class Guide:
    """One rollout's guidance and Advantage Margin, step by step. The rollout calls `start` with
    the start state's answer y (readout "step"), then per step `weigh` (the logits to take the
    answer from) and `measure` (the margin of the slots still running), and `margins` at the end."""

    def __init__(self, backbone, *, guidance: float, readout: str, labels: torch.Tensor | None):
        check_readouts(backbone, readout)
        self.backbone, self.readout = backbone, readout
        self.w = float(guidance)
        self.labels = labels  # (B, L): the margin is measured when given
        self.l_prev: torch.Tensor | None = None  # readout "step": f_O of y as the next step receives it
        self.l_u: torch.Tensor | None = None  # the current step's l_u
        self.sums: list[torch.Tensor] = []  # per step (B,) fp64: margin summed over supervised cells
        self.positive: list[torch.Tensor] = []  # per step (B,) int64: cells above MARGIN_TOL
        self.negative: list[torch.Tensor] = []  # per step (B,) int64: cells below -MARGIN_TOL

    def start(self, y: torch.Tensor | None) -> None:
        if self.readout != "step":
            return
        if y is None:
            raise ValueError(f"readout 'step' decodes the answer state as the first step receives it, and "
                             f"{type(self.backbone).__name__} carries no state")
        self.l_prev = self.backbone.decode(y)  # f_O(y_0): the first step's l_u

    def weigh(self, l_c: torch.Tensor, l_u: torch.Tensor | None) -> torch.Tensor:
        """The step's plain logits l_c (and, readout "cycle", its l_u) -> l_w. w = 1 gives l_c
        itself, so the plain rollout is computed exactly as without guidance."""
        if self.readout == "step":
            l_u, self.l_prev = self.l_prev, l_c
        self.l_u = l_u
        return torch.lerp(l_u.float(), l_c.float(), self.w) if self.w != 1.0 else l_c

    def measure(self, l_c: torch.Tensor, l_w: torch.Tensor, live: torch.Tensor) -> None:
        """The step's margin over the supervised cells of the slots still running (live (B,) bool)."""
        if self.labels is None:
            return
        m = advantage_margin(self.l_u, l_c, l_w, self.labels)  # (B, L) fp64
        counted = (self.labels != IGNORE) & live[:, None]
        self.sums.append(torch.where(counted, m, torch.zeros_like(m)).sum(-1))
        self.positive.append(((m > MARGIN_TOL) & counted).sum(-1))
        self.negative.append(((m < -MARGIN_TOL) & counted).sum(-1))

    def margins(self, n_max: int) -> dict[str, torch.Tensor]:
        """`Rollout`'s margin fields, padded with 0 to `n_max` steps ({} without labels)."""
        if self.labels is None:
            return {}
        pad = n_max - len(self.sums)

        def steps(rows: list[torch.Tensor]) -> torch.Tensor:
            return torch.nn.functional.pad(torch.stack(rows, 1), (0, pad))  # (B, n_max)

        return {"margin": steps(self.sums), "margin_positive": steps(self.positive), "margin_negative": steps(self.negative),
                "cells": (self.labels != IGNORE).sum(-1)}
