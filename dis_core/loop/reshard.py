"""A checkpoint's per-rank state under another number of processes (resuming 1 -> 2, 2 -> 1, ...).

Each rank's file (`dis_rank{r}.pt`, `TrainState.per_rank`) holds its share of the carry, its
position in the data stream, its random generator, the examples it consumed and the state of its
resumable components. Global batch g of the stream covers positions [g*G, (g+1)*G) and rank r of
W owns the r-th slice of G/W (dis_core.step.data), so the carries of ranks 0..W-1 in rank order
are the global batch's slots in stream order, whatever W. Under W' processes, rank r' takes
slots [r' G/W', (r'+1) G/W') of that concatenation, and every rank's stream restarts at the first
global batch no old rank had begun: with fixed halting (all slots refill together) that is exactly
where the old ranks stood, so the run continues as an uninterrupted run with W' processes would
(tests/test_distributed.py); with ACT, the unread rest of partly read global batches is skipped,
never read twice.

The random draws (halting exploration, target paths) are per rank, so they cannot be the same as
under W' processes from the start: new rank r' keeps old rank r''s generator where there was one,
and a new rank draws its seed from old rank r' mod W's. DeepSpeed holds the weights and the
optimizer; at ZeRO stage 0 they load under any W', but DeepSpeed 0.19 refuses to repartition ZeRO
stage 1/2 optimizer states for another process count (`check_zero`).
"""

from __future__ import annotations

from pathlib import Path

import structlog
import torch

from dis_core.contract.errors import CheckpointError

RANK_FILE = "dis_rank{rank}.pt"
log = structlog.get_logger()


def saved_world(ckpt: Path) -> int:
    """The processes that wrote checkpoint directory `ckpt`: its rank files 0, 1, ... present."""
    world = 0
    while (ckpt / RANK_FILE.format(rank=world)).is_file():
        world += 1
    return world


def check_zero(ckpt: Path, world: int, zero_stage: int) -> None:
    """DeepSpeed cannot load partitioned (ZeRO 1/2) optimizer states under another process count."""
    old = saved_world(ckpt)
    if zero_stage > 0 and old not in (0, world):
        raise CheckpointError(
            f"--resume: checkpoint {ckpt} was written by {old} process(es) with ZeRO stage {zero_stage}, which "
            f"partitions the optimizer state over the processes; DeepSpeed cannot repartition it for {world} "
            f"process(es). Resume with {old} process(es) (ZeRO stage 0 checkpoints resume under any number)")


def rank_state(ckpt: Path, rank: int, world: int, global_batch: int) -> dict:
    """Rank `rank` of `world`'s per-rank state from checkpoint `ckpt`, redistributed when the
    checkpoint was written by another number of processes. ValueError when the rank files hold
    another number of slots than `global_batch` (a rank file missing: an older checkpoint is tried)."""
    old = saved_world(ckpt)
    if old == world or old == 0:  # 0: the file is missing, and torch.load says which
        return torch.load(ckpt / RANK_FILE.format(rank=rank), weights_only=False)
    states = [torch.load(ckpt / RANK_FILE.format(rank=r), weights_only=False) for r in range(old)]
    carries = [_carry(s["carry"]) for s in states]
    slots = sum(len(c["steps"]) for c in carries)
    if slots != global_batch:
        raise ValueError(f"{ckpt}: the rank files of {old} process(es) hold {slots} slots, not the run's global batch "
                         f"of {global_batch} (the files of some processes missing?)")
    if rank == 0:
        log.info("resuming with another number of processes: the slots and the data stream are redistributed",
                 checkpoint=str(ckpt), written_by=old, processes=world)
    share, old_share = slots // world, slots // old
    rows = slice(rank * share, (rank + 1) * share)
    carry = {key: _rows(_cat([c[key] for c in carries]), rows) for key in carries[0]}
    # The first global batch no old rank had begun, for every new rank.
    started = max(-(-int(s["stream"]["taken"]) // old_share) for s in states)
    mine = {
        "carry": carry,
        "stream": {**states[0]["stream"], "taken": started * share},
        "generator": _generator(states, rank),
        "examples": sum(int(s["examples"]) for s in states) if rank == 0 else 0,
    }
    if "components" in states[0]:
        mine["components"] = states[rank % old]["components"]
    return mine


def _carry(carry: dict) -> dict:
    carry = dict(carry)
    if "y" in carry:  # written before the state was generic
        carry["state"] = (carry.pop("y"), carry.pop("z"))
    return carry


def _cat(parts: list):
    """Per-rank values of one carry field joined along the slots: tensors, tuples of them,
    dicts of them, or None."""
    first = parts[0]
    if first is None:
        return None
    if torch.is_tensor(first):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    return tuple(_cat(list(p)) for p in zip(*parts, strict=True))


def _rows(value, rows: slice):
    if value is None:
        return None
    if torch.is_tensor(value):
        return value[rows].clone()
    if isinstance(value, dict):
        return {k: _rows(v, rows) for k, v in value.items()}
    return tuple(_rows(v, rows) for v in value)


def _generator(states: list[dict], rank: int) -> torch.Tensor:
    if rank < len(states):
        return states[rank]["generator"]
    source = torch.Generator()
    source.set_state(states[rank % len(states)]["generator"])
    seed = int(torch.randint(0, 2**62, (1,), generator=source)) + rank
    return torch.Generator().manual_seed(seed).get_state()
