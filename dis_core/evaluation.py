"""Evaluating a model on a test split: every evaluator over every (or the first `limit`) example.

Shared by the trainer's periodic evaluation and by anything that scores a checkpoint. Each rank
takes its slice of every test batch (`dis_core.data.eval_chunks`), runs `supervision.rollout`
from a fresh state, and feeds its evaluators; rank 0 merges the evaluators' states.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from dis_core import engine as dist
from dis_core.data import eval_chunks, fetch
from dis_core.interfaces import EvalRecord
from dis_core.logs import progress
from dis_core.supervision import StepRule, rollout


def eval_batch_size(requested: int, world: int) -> int:
    """A multiple of the process count (each rank takes an equal slice), at least one per rank."""
    return max(world, requested - requested % world)


@torch.inference_mode()
def evaluate(backbone: torch.nn.Module, puzzle_emb, dataset, evaluators: dict, rule: StepRule, halting, *,
             batch_size: int, limit: int | None, device, generator: torch.Generator | None,
             out_dir: Callable[[str], Path | None], bf16: bool = False, check=None) -> dict[str, float]:
    """`<evaluator>/<metric>` metrics on rank 0 ({} elsewhere). The caller sets eval mode (and
    swaps in EMA weights); `out_dir(name)` is where evaluator `name` may write files; `check`
    (`dis_core.checks.Boundary.batch`) checks each test batch against the task's spec."""
    rank, world = dist.rank(), dist.world_size()
    for ev in evaluators.values():
        ev.reset()
    size = len(dataset) if limit is None else min(len(dataset), limit)
    batch_size = eval_batch_size(batch_size, world)
    with progress(math.ceil(size / batch_size), "eval", rank=rank, unit="batch") as bar:
        for idx, n_real in eval_chunks(size, batch_size, rank, world):
            batch = fetch(dataset, idx, device, check)
            emb = puzzle_emb(batch["puzzle_ids"]) if puzzle_emb is not None else None
            out = rollout(backbone, batch, rule, halting, puzzle_emb=emb, generator=generator, bf16=bf16)
            if n_real:
                record = EvalRecord(
                    batch={k: v[:n_real].cpu() for k, v in batch.items()},
                    preds=out.preds[:n_real].cpu(), q_halt=out.q_halt[:n_real].cpu(), steps=out.steps[:n_real].cpu(),
                )
                for ev in evaluators.values():
                    ev.update(record)
            bar.update(1)
    metrics: dict[str, float] = {}
    for name, ev in evaluators.items():
        states = dist.gather_objects(ev.state())
        if rank == 0:
            metrics |= {f"{name}/{k}": float(v) for k, v in ev.compute(states, out_dir(name)).items()}
    return metrics
