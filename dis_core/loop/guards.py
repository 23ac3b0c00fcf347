"""Divergence guards: a non-finite loss or gradient never reaches the weights or a checkpoint.

`check_step` runs after backward and before the optimizer step. It looks at the loss and the
global gradient norm (dense parameters and the puzzle-embedding rows), agrees across ranks (one
tiny all-reduce, so every rank takes the same branch), and then, by `train.on_nonfinite`:
  "stop"  raise `RunDiverged` (exit status 3): nothing of this step is applied, no checkpoint is
          written afterwards, and `checkpoints/latest` stays on the last good one;
  "skip"  return False: the caller drops the update and the batch and goes on. After
          `MAX_CONSECUTIVE_SKIPS` skipped steps in a row the run stops anyway (it is not
          recovering, and every further step would be skipped too).
`check_weights` is the last line of defence before a checkpoint write.

The gradient norm covers the gradients held on the parameters after backward (ZeRO stages 2 and 3
keep them partitioned inside the optimizer; there the loss alone is checked before the update,
and `check_weights` before every checkpoint).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import structlog
import torch

from dis_core.loop import engine as dist
from dis_core.contract.errors import RunDiverged

log = structlog.get_logger()

MAX_CONSECUTIVE_SKIPS = 20
ADVICE = (
    "lower the learning rate (train.optimizer.config.lr), add a warm-up (train.schedule.warmup_steps), "
    "clip gradients (train.grad_clip), or set train.on_nonfinite = \"skip\" to drop such steps"
)


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients present (fp32 scalar on the CPU; 0 when there are none)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.stack(norms).norm().cpu()


def grads_of(module: torch.nn.Module, puzzle_emb=None) -> list[torch.Tensor]:
    """The tensors whose gradients the coming update applies: the module's parameters and the
    puzzle-embedding rows used since its last step."""
    params = [p for p in module.parameters() if p.requires_grad]
    if puzzle_emb is not None:
        params += puzzle_emb.pending_rows()
    return params


def drop_update(ds_engine, puzzle_emb=None) -> None:
    """Forget this step's gradients without touching any weight or optimizer state."""
    ds_engine.zero_grad()
    try:
        ds_engine.optimizer.zero_grad(set_to_none=True)  # wrappers (bf16, ZeRO) keep their own copies
    except TypeError:
        ds_engine.optimizer.zero_grad()
    if puzzle_emb is not None:
        puzzle_emb.discard_pending()


class NonFiniteGuard:
    """Per-run state of the check: the policy and the count of consecutive skipped steps."""

    def __init__(self, policy: str = "stop", *, newest_checkpoint: Callable[[], Path | None] | None = None):
        if policy not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.newest_checkpoint = newest_checkpoint  # named in the message: where the last good weights are
        self.skipped = 0  # in the whole session
        self.in_a_row = 0

    def check_step(self, step: int, loss: torch.Tensor, params: Iterable[torch.Tensor]) -> bool:
        """True when the step may be applied. `params`: every tensor whose `.grad` the update uses.
        A collective: every rank calls it at every step."""
        norm = grad_norm(params)
        loss_value = loss.detach().float().cpu()
        # on the loss's device: NCCL reduces CUDA tensors only
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss_value)) and bool(torch.isfinite(norm)) else 1.0], device=loss.device)
        bad = dist.all_reduce_sum(bad)
        if not bad.item():
            self.in_a_row = 0
            return True
        what = f"loss {_fmt(loss_value)}, gradient norm {_fmt(norm)}" + (" on this rank" if dist.world_size() > 1 else "")
        if self.policy == "skip" and self.in_a_row < MAX_CONSECUTIVE_SKIPS:
            self.skipped += 1
            self.in_a_row += 1
            log.warning("non-finite step skipped (train.on_nonfinite = 'skip')", step=step, detail=what, skipped_in_a_row=self.in_a_row)
            return False
        reason = f"{MAX_CONSECUTIVE_SKIPS} non-finite steps in a row (train.on_nonfinite = 'skip')" if self.policy == "skip" else "training diverged"
        kept = self._last_good()
        raise RunDiverged(f"step {step}: {reason}: {what}. The update was not applied; {kept}. To go on: {ADVICE}.", step=step)


    def _last_good(self) -> str:
        newest = self.newest_checkpoint() if self.newest_checkpoint is not None else None
        if newest is None:
            return "no checkpoint had been written yet"
        return f"the newest checkpoint, {newest}, holds the last good weights"


def check_weights(tensors: Iterable[tuple[str, torch.Tensor]], step: int) -> None:
    """Refuse to checkpoint non-finite weights (raise `RunDiverged` naming the first tensors)."""
    bad = [name for name, t in tensors if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise RunDiverged(
            f"step {step}: not writing a checkpoint: non-finite values in {shown}; `latest` stays on the "
            f"previous checkpoint. To go on: {ADVICE}.", step=step,
        )


def _fmt(t: torch.Tensor) -> str:
    v = float(t)
    return str(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
