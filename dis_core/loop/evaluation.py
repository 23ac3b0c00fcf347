"""Evaluating a model on a test split: every evaluator over every (or the first `limit`) example.

Shared by the trainer's periodic evaluation and by anything that scores a checkpoint. Each rank
takes its slice of every test batch (`dis_core.step.data.eval_chunks`), runs `supervision.rollout`
from a fresh state, and feeds its evaluators; rank 0 merges the evaluators' states.

Besides the evaluators' metrics, every evaluation reports `diagnostics/*`: the mean steps and
network calls an example got (they vary with an adaptive halting rule) and, with `margin`, the
Advantage Margin per step (paper Prop. 4.1). A guidance sweep (`guidance`, paper Eq. 5) scores
each w in the same pass: one more rollout per batch for each w != 1, scored by fresh copies of
the evaluators, its metrics named `<evaluator>/<metric>@w=<w>` (w = 1 reuses the plain rollout).
"""

from __future__ import annotations

import copy
import math
import weakref
from pathlib import Path
from typing import Callable, Sequence

import structlog
import torch

from dis_core.loop import engine as dist
from dis_core.step.data import eval_chunks, fetch
from dis_core.step.diagnostics import RolloutDiagnostics
from dis_core.contract.interfaces import EvalRecord
from dis_core.contract.logs import progress
from dis_core.step.guidance import has_readouts

log = structlog.get_logger()
# Backbones already warned about having no readout: a run evaluates many times, and says it once.
_NO_READOUT_SAID: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def eval_batch_size(requested: int, world: int) -> int:
    """A multiple of the process count (each rank takes an equal slice), at least one per rank."""
    return max(world, requested - requested % world)


def options(eval_cfg) -> dict:
    """The recipe's `[eval]` table as `evaluate` keywords."""
    return {"guidance": tuple(eval_cfg.guidance), "readout": eval_cfg.readout, "margin": eval_cfg.margin}


def guidance_suffix(w: float) -> str:
    """`@w=0.5`: the suffix of a metric scored at guidance scale w."""
    return f"@w={float(w):g}"


@torch.inference_mode()
def evaluate(solver, dataset, *, batch_size: int, limit: int | None, generator: torch.Generator | None,
             out_dir: Callable[[str], Path | None], check=None,
             guidance: Sequence[float] = (), readout: str = "step", margin: bool = False) -> dict[str, float]:
    """The `solver`'s evaluators over `dataset`: `<evaluator>/<metric>` and `diagnostics/<metric>`
    metrics on rank 0 ({} elsewhere). The caller sets eval mode (`solver.evaluating()`, and swaps
    in EMA weights); `out_dir(name)` is where evaluator `name` may write files; `check`
    (`dis_core.contract.checks.Boundary.batch`) checks each test batch against the task's spec.
    `guidance`: the w values to score besides the plain evaluation (w = 1); `readout`: "step" or
    "cycle" (see `supervision.rollout`); `margin`: the Advantage Margin rows, dropped if the
    backbone cannot read out before the step (with a warning, once per backbone)."""
    rank, world = dist.rank(), dist.world_size()
    backbone, evaluators = solver.backbone, solver.evaluators
    if "diagnostics" in evaluators:
        raise ValueError("'diagnostics' names the core's own metrics (diagnostics/*): name the evaluator otherwise")
    if margin and not has_readouts(backbone, readout):
        if backbone not in _NO_READOUT_SAID:
            _NO_READOUT_SAID.add(backbone)
            log.warning("the backbone has no readout before its step: no advantage_margin rows", backbone=type(backbone).__name__)
        margin = False
    sweep = [float(w) for w in dict.fromkeys(guidance)]
    calls = backbone.calls_per_step()[0]
    # One set of evaluators and diagnostics per distinct rollout: the plain one (key None), and
    # one per w != 1 of the sweep (fresh copies: evaluators keep state).
    sets = {None: evaluators} | {w: {n: copy.deepcopy(ev) for n, ev in evaluators.items()} for w in sweep if w != 1.0}
    diags = {key: RolloutDiagnostics(calls) for key in sets}
    for evs in sets.values():
        for ev in evs.values():
            ev.reset()
    size = len(dataset) if limit is None else min(len(dataset), limit)
    batch_size = eval_batch_size(batch_size, world)
    with progress(math.ceil(size / batch_size), "eval", rank=rank, unit="batch") as bar:
        for idx, n_real in eval_chunks(size, batch_size, rank, world):
            batch = fetch(dataset, idx, solver.device, check)
            for key in sets:
                out = solver.rollout(batch, generator=generator, guidance=1.0 if key is None else key, readout=readout, margin=margin)
                if not n_real:
                    continue
                record = EvalRecord(
                    batch={k: v[:n_real].cpu() for k, v in batch.items()},
                    preds=out.preds[:n_real].cpu(), q_halt=out.q_halt[:n_real].cpu(), steps=out.steps[:n_real].cpu(),
                )
                for ev in sets[key].values():
                    ev.update(record)
                diags[key].update(out, n_real)
            bar.update(1)
    metrics: dict[str, float] = {}
    for key, evs in sets.items():
        suffix = "" if key is None else guidance_suffix(key)
        named = {**evs, "diagnostics": diags[key]}
        for name, ev in named.items():
            states = dist.gather_objects(ev.state())
            if rank != 0:
                continue
            where = out_dir(name if key is None else f"{name}{suffix}") if name != "diagnostics" else None
            found = compute_into(ev, states, where) if name != "diagnostics" else ev.compute(states)
            metrics |= {f"{name}/{k}{suffix}": float(v) for k, v in found.items()}
    if 1.0 in sweep and rank == 0:  # w = 1 is the plain rollout: its set is a copy under the sweep's names
        plain = [k for k in metrics if "@w=" not in k]
        metrics |= {f"{k}{guidance_suffix(1.0)}": metrics[k] for k in plain}
    return metrics


def compute_into(evaluator, states: list, where: Path | None) -> dict[str, float]:
    """`evaluator.compute(states, where)` with `where` created first, as contract 1.0 promised
    (an evaluator may write there without making it), and removed again when it stayed empty, so
    that a run has no empty evaluation folders."""
    if where is None:
        return evaluator.compute(states, where)
    made = [p for p in (where, *where.parents) if not p.exists()]  # innermost first
    where.mkdir(parents=True, exist_ok=True)
    try:
        return evaluator.compute(states, where)
    finally:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
