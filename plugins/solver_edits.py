"""Target generator `solver_edits`: intermediate answers in the order a task's own solver
fixes the cells (the paper's "programmable edits").

The task does the solving: it must offer `solver_trajectory(batch, n_sup)` (the optional
`SolverTrajectoryTask` capability). Tasks build it with `dis_core.contract.reveal.ranked_reveal`, which
turns a per-cell solve order into frames by the same rule as the reference reveal path: frame
s (1-based) shows floor(s * missing / n_sup) of the missing cells on top of the question, so
the last frame is y*.
"""

from __future__ import annotations

import attrs
import torch

from dis_core import hookimpl
from dis_core.contract.errors import CapabilityError

# Generators that need nothing from the task, named in the capability error.
TASK_AGNOSTIC = ("reveal_path", "mask", "random_replace", "final")


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
        ctx.fail(
            f"task {name!r} offers no solver trajectory (it has no solver_trajectory(batch, n_sup) "
            f"method); use a generator that works with any task: {', '.join(TASK_AGNOSTIC)}",
            error=CapabilityError,
        )
    return SolverEdits(task)


@hookimpl
def register_target_generators(register):
    register("solver_edits", SolverEditsConfig, build_solver_edits)
