"""Target generator `solver_edits`: intermediate answers in the order a task's own solver
fixes the cells (the paper's "programmable edits").

The task does the solving: it must offer `solver_trajectory(batch, n_sup)` (the optional
`SolverTrajectoryTask` capability). `ranked_reveal` below is the shared way tasks turn a
per-cell solve order into frames, so every solver-ordered task reveals cells by the same rule
as the reference reveal path: frame s (1-based) shows floor(s * missing / n_sup) of the
missing cells on top of the question, so the last frame is y*.
"""

from __future__ import annotations

import attrs
import torch

from dis_core import hookimpl
from dis_core.errors import CapabilityError
from dis_core.interfaces import IGNORE

# Generators that need nothing from the task, named in the capability error.
TASK_AGNOSTIC = ("reveal_path", "mask", "random_replace", "final")


def ranked_reveal(inputs: torch.Tensor, labels: torch.Tensor, rank: torch.Tensor, n_sup: int) -> torch.Tensor:
    """inputs, labels (B, L) int64; rank (B, L) int64, smaller = fixed earlier (only cells
    where inputs != labels are looked at; ties keep position order) -> (B, n_sup, L) int64.

    Frame s-1 (s = 1..n_sup) takes labels on the first floor(s * missing / n_sup) differing
    cells and inputs elsewhere; cells whose label is IGNORE stay IGNORE in every frame."""
    B, L = labels.shape
    supervised = labels != IGNORE
    diff = (inputs != labels) & supervised  # (B, L) the cells a solver has to fill
    key = torch.where(diff, rank, torch.full_like(rank, torch.iinfo(torch.int64).max))
    order = torch.sort(key, dim=1, stable=True).indices  # (B, L) cells in reveal order
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(L, device=labels.device).expand(B, L))  # (B, L) place in that order
    missing = diff.sum(1)  # (B,)
    s = torch.arange(1, n_sup + 1, device=labels.device)
    shown = (s[None, :] * missing[:, None]) // n_sup  # (B, N) cells revealed by each frame
    revealed = diff[:, None, :] & (pos[:, None, :] < shown[:, :, None])  # (B, N, L)
    frames = torch.where(revealed, labels[:, None, :], inputs[:, None, :])
    return torch.where(supervised[:, None, :], frames, torch.full_like(frames, IGNORE))


@attrs.frozen(kw_only=True)
class SolverEditsConfig:
    """No options: the order comes from the task's solver."""


class SolverEdits:
    """Delegates to `task.solver_trajectory`; monotone because cells are only ever revealed."""

    monotone = True

    def __init__(self, task):
        self.task = task

    def __call__(self, batch, n_sup: int, generator: torch.Generator) -> torch.Tensor:
        frames = self.task.solver_trajectory(batch, n_sup)
        return frames.to(batch["labels"].device, torch.int64)


def build_solver_edits(config: SolverEditsConfig, ctx) -> SolverEdits:
    """Reveal cells in the order the task's own solver fixes them (Sudoku, Maze, N-Queens)."""
    task = ctx.task
    if not callable(getattr(task, "solver_trajectory", None)):
        name = getattr(task, "name", type(task).__name__)
        raise CapabilityError(
            f"{ctx.component or 'target generator solver_edits'}: task {name!r} offers no solver "
            f"trajectory (it has no solver_trajectory(batch, n_sup) method); use a generator that "
            f"works with any task: {', '.join(TASK_AGNOSTIC)}"
        )
    return SolverEdits(task)


@hookimpl
def register_target_generators(register):
    register("solver_edits", SolverEditsConfig, build_solver_edits)
