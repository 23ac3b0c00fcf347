"""Target generator `row_sweep`: intermediate answers that fix the wrong cells in reading order.

Step s of N shows y* on the first ceil(s * k / N) cells (in row-major order, or from the end with
`direction = "backward"`) where the question differs from y*, and the question everywhere else.
Deterministic, and monotone by construction.
"""

from typing import Literal

import attrs
import torch

from dis_core import hookimpl
from dis_core.interfaces import IGNORE


@attrs.frozen(kw_only=True)
class RowSweepConfig:
    # Where the sweep starts: "forward" fixes the first wrong cell first, "backward" the last.
    direction: Literal["forward", "backward"] = "forward"


class RowSweep:
    monotone = True

    def __init__(self, config: RowSweepConfig):
        self.config = config

    def __call__(self, batch, n_sup, generator):
        x, y = batch["inputs"], batch["labels"]  # (B, L) each
        differs = (x != y) & (y != IGNORE)
        backward = self.config.direction == "backward"
        if backward:
            differs = differs.flip(-1)
        order = differs.long().cumsum(-1)  # (B, L): 1 for the first differing cell, 2 for the next...
        if backward:
            order = order.flip(-1)
            differs = differs.flip(-1)
        total = differs.sum(-1, keepdim=True)  # (B, 1)
        frames = []
        for s in range(1, n_sup + 1):
            shown = torch.ceil(total * s / n_sup)  # cells fixed by step s
            reveal = differs & (order <= shown)
            frames.append(torch.where(reveal | ~differs, y, x))
        return torch.stack(frames, 1)  # (B, N, L)


def build_row_sweep(config: RowSweepConfig, ctx) -> RowSweep:
    """Fix wrong cells in reading order, an equal share per supervision step."""
    return RowSweep(config)


@hookimpl
def register_target_generators(register):
    register("row_sweep", RowSweepConfig, build_row_sweep)
