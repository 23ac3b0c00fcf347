"""What a checkpoint holds of a training run, and how a run resumes from one.

Shared by every rank (written by DeepSpeed's client state): the step, the cost ledger, the EMA
shadow, the puzzle table. Per rank: the carry of slots, the stream position, the halting/target
RNG, the examples this rank consumed, and digests that let anyone check that data-parallel ranks
hold identical weights. `dis_core.checkpoint` does the crash-safe writing, the fallback past
unreadable checkpoints and the retention.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import structlog
import torch

from dis_core import checkpoint
from dis_core.accounting import Ledger
from dis_core.supervision import Carry

log = structlog.get_logger()


def save(t) -> Path:
    """Write trainer `t`'s full state as checkpoint step_N, then apply the retention rules."""
    shared = {"step": t.step, "ledger": attrs.asdict(t.ledger)}
    if t.ema is not None:
        shared["ema"] = t.ema.state_dict()
    if t.puzzle_emb is not None:
        shared["puzzle_emb"] = t.puzzle_emb.state_dict()
    mine = {
        "carry": t.carry.state_dict(), "stream": t.stream.state_dict(), "generator": t.generator.get_state(),
        "examples": t.ledger.examples,
        "params_sha256": checkpoint.params_digest(t.engine.module),
    }
    if t.puzzle_emb is not None:
        mine["puzzle_emb_sha256"] = checkpoint.params_digest(t.puzzle_emb)
    # With EMA on, the weights to evaluate are the EMA ones (the reference saves only those);
    # the live weights stay in the DeepSpeed files so that training can resume.
    extra = {"ema_weights.pt": t.ema.model_state_dict(t.engine.module)} if t.ema is not None else None
    metrics = t.last_eval if t.last_eval_step == t.step else None
    path = checkpoint.save(t.engine, t.run.checkpoints, t.step, shared, mine, extra, metrics=metrics)
    cfg = t.train_cfg
    if t.rank == 0:
        checkpoint.prune(t.run.checkpoints, t.world, keep=cfg.keep_checkpoints, best=cfg.keep_best, mode=cfg.keep_best_mode)
    return path


def restore(t) -> str | None:
    """Load the newest loadable checkpoint into trainer `t` (unreadable newer ones are skipped
    and named); returns its tag. A run stopped before its first checkpoint has nothing to load:
    it starts again from step 0 in the same directory, its metrics rows dropped (None)."""
    if not checkpoint.written(t.run.checkpoints):
        dropped = t.run.truncate_metrics(0)
        log.warning("no checkpoint to resume from: the run starts again from step 0 in place",
                    run=str(t.run.path), dropped_rows=dropped)
        return None
    tag, shared, mine, _skipped = checkpoint.load_newest(t.engine, t.run.checkpoints, t.world)
    t.step = shared["step"]
    t.ledger = Ledger(**shared["ledger"])
    t.ledger.examples = mine["examples"]
    if t.ema is not None:
        t.ema.load_state_dict(shared["ema"])
    if t.puzzle_emb is not None:
        t.puzzle_emb.load_state_dict(shared["puzzle_emb"])
    t.carry = Carry.from_state_dict({k: (v.to(t.device) if torch.is_tensor(v) else v) for k, v in mine["carry"].items()})
    t.carry.batch = {k: v.to(t.device) for k, v in t.carry.batch.items()}
    t.stream.load_state_dict(mine["stream"])
    t.generator.set_state(mine["generator"])
    t.run.truncate_metrics(t.step)
    log.info("resumed", checkpoint=str(t.run.checkpoints / tag), step=t.step)
    return tag


def newest(t) -> Path | None:
    """The newest complete checkpoint of trainer `t`'s run, if any."""
    root = t.run.checkpoints
    tag = checkpoint.find_latest(root, t.world) if root.is_dir() else None
    return root / tag if tag else None
