"""Crash-safe checkpoints of the full training state.

DeepSpeed saves the module and the (possibly ZeRO-partitioned) optimizer; each rank adds its own
file with what is per-rank (carry, stream position, RNG). Everything is first written under
`.tmp-step_N/`, renamed to `step_N/` once every rank is done, and only then does the `latest`
pointer move (an atomic file replace). A kill at any moment leaves the previous checkpoint and
`latest` intact; `load` also falls back to the newest complete `step_N/` if `latest` is missing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from dis_core import engine as dist_engine
from dis_core.rundir import atomic_write

RANK_FILE = "dis_rank{rank}.pt"


def _complete(path: Path, world: int) -> bool:
    return path.is_dir() and all((path / RANK_FILE.format(rank=r)).exists() for r in range(world))


def save(ds_engine, root: Path, step: int, shared_state: dict, rank_state: dict, extra: dict | None = None) -> Path:
    """`extra`: {file name: object} that rank 0 saves beside (e.g. the EMA weights to evaluate)."""
    rank, world = dist_engine.rank(), dist_engine.world_size()
    tmp_tag, tag = f".tmp-step_{step}", f"step_{step}"
    if rank == 0 and (root / tmp_tag).exists():
        shutil.rmtree(root / tmp_tag)  # leftovers of a write that was killed
    dist_engine.barrier()
    ds_engine.save_checkpoint(str(root), tag=tmp_tag, client_state=shared_state, save_latest=False)
    torch.save(rank_state, root / tmp_tag / RANK_FILE.format(rank=rank))
    if rank == 0:
        for name, obj in (extra or {}).items():
            torch.save(obj, root / tmp_tag / name)
    dist_engine.barrier()
    if rank == 0:
        if (root / tag).exists():
            shutil.rmtree(root / tag)
        (root / tmp_tag).rename(root / tag)
        atomic_write(root / "latest", tag + "\n")
    dist_engine.barrier()
    return root / tag


def find_latest(root: Path, world: int) -> str | None:
    pointer = root / "latest"
    if pointer.exists():
        tag = pointer.read_text().strip()
        if _complete(root / tag, world):
            return tag
    steps = sorted(
        (int(m.group(1)), p.name)
        for p in root.glob("step_*")
        if (m := re.fullmatch(r"step_(\d+)", p.name)) and _complete(p, world)
    )
    return steps[-1][1] if steps else None


def load(ds_engine, root: Path, tag: str) -> tuple[dict, dict]:
    """Restore module + optimizer into the engine; return (shared client state, this rank's state)."""
    _, client = ds_engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if client is None:
        raise FileNotFoundError(f"no loadable DeepSpeed checkpoint in {root / tag}")
    rank_state = torch.load(root / tag / RANK_FILE.format(rank=dist_engine.rank()), weights_only=False)
    return client, rank_state
