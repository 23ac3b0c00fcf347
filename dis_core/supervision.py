"""One supervision step as a module (what DeepSpeed wraps), and the carry of slot states.

The carry holds, per slot (batch row): the recurrent state (y, z), how many supervision steps
the slot has run, whether it halted, its example, its per-step targets and the token input of
its next step. A halted slot is refilled with the next example of the stream before the step.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from dis_core.interfaces import IGNORE, Batch
from dis_core.losses import per_sequence_ce


def step_weight(step: torch.Tensor, n_sup: int, kind: str) -> torch.Tensor:
    """Loss weight of each slot's step. uniform: 1 (official code: every step its own optimizer
    step at the same scale). linear: w_s = 2s/(N+1), increasing with mean 1 (the paper)."""
    if kind == "uniform":
        return torch.ones_like(step, dtype=torch.float32)
    return 2.0 * step.to(torch.float32) / (n_sup + 1)


def sequence_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every supervised cell's argmax equals the label."""
    valid = labels != IGNORE
    return ((logits.argmax(-1) == labels) | ~valid).all(-1)


class SupervisedStep(nn.Module):
    """backbone + loss. Returns the per-rank mean loss, so DeepSpeed's gradient averaging over
    ranks gives the global per-example mean the reference gets from SUM(loss / global_batch)."""

    def __init__(self, backbone: nn.Module, halting, *, loss: str, n_sup: int, step_weights: str, step_input: str):
        super().__init__()
        self.backbone = backbone
        self.halting = halting  # plain object, not a submodule
        self.loss_kind, self.n_sup, self.step_weights, self.step_input = loss, n_sup, step_weights, step_input

    def forward(self, y, z, tokens, step, targets, labels, inputs, puzzle_emb=None):
        dtype = next(self.backbone.parameters()).dtype
        if puzzle_emb is not None:
            puzzle_emb = puzzle_emb.to(dtype)
        (y, z), logits, q = self.backbone((y, z), tokens, step, puzzle_emb)
        ce = per_sequence_ce(logits, targets, self.loss_kind)  # (B,)
        total = step_weight(step, self.n_sup, self.step_weights) * ce
        if self.halting.uses_q_head:
            with torch.no_grad():
                correct = sequence_correct(logits, labels).to(torch.float32)
            total = total + self.halting.loss(q, correct)
            if getattr(self.halting, "uses_continue_loss", False):
                # HRM's Q-continue target: one more no-grad forward from the new state, on the
                # input the next step would get (the reference's extra inner forward).
                with torch.no_grad():
                    nxt = logits.argmax(-1) if self.step_input == "prediction" else inputs
                    _, _, next_q = self.backbone((y.detach(), z.detach()), nxt, step + 1, puzzle_emb)
                total = total + self.halting.continue_loss(q, next_q.float(), step >= self.halting.max_steps)
        return total.mean(), y, z, logits, q, ce.detach()


@attrs.define
class Carry:
    y: torch.Tensor  # (B, S, D) answer state
    z: torch.Tensor  # (B, S, D) latent state
    steps: torch.Tensor  # (B,) int64 supervision steps run
    halted: torch.Tensor  # (B,) bool; True at start, so the first step fills every slot
    batch: Batch  # the slots' examples
    targets: torch.Tensor  # (B, N, L) int64 per-step targets
    tokens: torch.Tensor  # (B, L) int64 token input of the next step

    @classmethod
    def empty(cls, backbone, batch_size: int, seq_len: int, n_sup: int, device) -> "Carry":
        y, z = backbone.initial_state(batch_size)
        long = dict(dtype=torch.int64, device=device)
        return cls(
            y=y.to(device),
            z=z.to(device),
            steps=torch.zeros(batch_size, **long),
            halted=torch.ones(batch_size, dtype=torch.bool, device=device),
            batch={},
            targets=torch.full((batch_size, n_sup, seq_len), IGNORE, **long),
            tokens=torch.zeros(batch_size, seq_len, **long),
        )

    def refill(self, rows: torch.Tensor, new: Batch, targets: torch.Tensor, init: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put fresh examples into the slots `rows` (1-D int64) and reset their state."""
        if not self.batch:  # first fill: adopt the keys and shapes of the task's batches
            self.batch = {k: torch.zeros((len(self.steps), *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in new.items()}
        for k, v in new.items():
            self.batch[k][rows] = v
        self.targets[rows] = targets
        self.tokens[rows] = new["inputs"]
        self.y[rows] = init[0][: len(rows)].to(self.y.dtype)
        self.z[rows] = init[1][: len(rows)].to(self.z.dtype)
        self.steps[rows] = 0
        self.halted[rows] = False

    def state_dict(self) -> dict:
        return attrs.asdict(self, recurse=False)

    @classmethod
    def from_state_dict(cls, state: dict) -> "Carry":
        return cls(**state)
