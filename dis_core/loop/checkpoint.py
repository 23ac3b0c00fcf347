"""Crash-safe checkpoints of the full training state.

DeepSpeed saves the module and the (possibly ZeRO-partitioned) optimizer; each rank adds its own
file with what is per-rank (carry, stream position, RNG). Everything is first written under
`.tmp-step_N/`, renamed to `step_N/` once every rank is done, and only then does the `latest`
pointer move (an atomic file replace). A kill at any moment leaves the previous checkpoint and
`latest` intact; a failed write (a full disk) removes its temporary folder and says so; weights
with NaN or inf are never written (guards.py).

Resuming (`load_newest`) tries `latest`, then every other complete `step_N/`, newest first: a
checkpoint that cannot be read (truncated, corrupted) is skipped with a warning naming it. One
written for another model (other tensor names or shapes) stops with the tensors named.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import structlog
import torch

from dis_core.loop import engine as dist_engine
from dis_core.loop import guards, reshard
from dis_core.contract.errors import CheckpointError
from dis_core.outputs.rundir import atomic_write

RANK_FILE = "dis_rank{rank}.pt"
log = structlog.get_logger()


def params_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state: equal on every data-parallel rank (tests check it)."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _complete(path: Path, world: int) -> bool:
    return path.is_dir() and all((path / RANK_FILE.format(rank=r)).exists() for r in range(world))


def _tensors(ds_engine, extra: dict | None):
    yield from ds_engine.module.state_dict().items()
    for name, obj in (extra or {}).items():
        if isinstance(obj, dict):
            yield from ((f"{name}:{k}", v) for k, v in obj.items() if torch.is_tensor(v))


def _write_failure(exc: BaseException) -> bool:
    """An OSError, or torch's C++ writer failing: it raises RuntimeError on a full disk, and on a
    folder it cannot create ("Parent directory ... does not exist": DeepSpeed only logs that)."""
    text = str(exc).lower()
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and ("write" in text or "parent directory" in text))


def _reason(exc: BaseException) -> str:
    return f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _estimate_bytes(root: Path, ds_engine, shared_state: dict, rank_state: dict, world: int) -> int:
    """What the next checkpoint will take: the newest one's size, else the tensors about to be
    written (the module, ~2x it for Adam's moments, and the client states)."""
    newest = find_latest(root, world) if root.is_dir() else None
    if newest:
        return dir_bytes(root / newest)

    def nbytes(obj) -> int:
        if torch.is_tensor(obj):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(v) for v in obj)
        return 0

    module = sum(p.numel() * p.element_size() for p in ds_engine.module.parameters())
    return 3 * module + nbytes(shared_state) + world * nbytes(rank_state)


def _check_space(root: Path, needed: int, tag: str) -> None:
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    if free < needed * 1.05:
        raise CheckpointError(
            f"not enough disk space for checkpoint {tag} under {root}: it needs about {needed / 2**20:.0f} MiB and "
            f"{free / 2**20:.0f} MiB are free. Nothing was written; free space (or lower train.keep_checkpoints) "
            f"and resume with --resume"
        )


def save(ds_engine, root: Path, step: int, shared_state: dict, rank_state: dict, extra: dict | None = None,
         metrics: dict | None = None) -> Path:
    """`extra`: {file name: object} that rank 0 saves beside (e.g. the EMA weights to evaluate);
    `metrics`: the evaluation of this step, if any (kept in metrics.json for keep-best)."""
    rank, world = dist_engine.rank(), dist_engine.world_size()
    tmp_tag, tag = f".tmp-step_{step}", f"step_{step}"
    guards.check_weights(_tensors(ds_engine, extra), step)  # the same weights on every rank: all raise
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _check_space(root, _estimate_bytes(root, ds_engine, shared_state, rank_state, world), tag)
            if (root / tmp_tag).exists():
                shutil.rmtree(root / tmp_tag)  # leftovers of a write that was killed
            # Created here, not by DeepSpeed, which logs a folder it cannot create and goes on.
            (root / tmp_tag).mkdir()
        except OSError as exc:
            raise CheckpointError(
                f"cannot write checkpoint {tag} under {root}: {_reason(exc)}. Make that directory writable "
                f"(or pass another --out) and resume with --resume"
            ) from None
    dist_engine.barrier()
    try:
        ds_engine.save_checkpoint(str(root), tag=tmp_tag, client_state=shared_state, save_latest=False)
        torch.save(rank_state, root / tmp_tag / RANK_FILE.format(rank=rank))
        if rank == 0:
            for name, obj in (extra or {}).items():
                torch.save(obj, root / tmp_tag / name)
            if metrics:
                atomic_write(root / tmp_tag / "metrics.json", json.dumps(metrics, sort_keys=True))
    except Exception as exc:
        if not _write_failure(exc):
            raise
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {tag} under {root}: {_reason(exc)}; its temporary folder was removed and "
            f"{_kept(root, world)}. Free space on that disk or make it writable (or pass another --out) and resume with --resume"
        ) from None
    dist_engine.barrier()
    if rank == 0:
        try:
            if (root / tag).exists():
                shutil.rmtree(root / tag)
            (root / tmp_tag).rename(root / tag)
            atomic_write(root / "latest", tag + "\n")
        except OSError as exc:
            raise CheckpointError(f"could not finish checkpoint {tag} under {root}: {_reason(exc)}; {_kept(root, world)}") from None
        log.info("checkpoint", path=str(root / tag), mib=round(dir_bytes(root / tag) / 2**20, 1))
    dist_engine.barrier()
    return root / tag


def _kept(root: Path, world: int) -> str:
    previous = find_latest(root, world)
    return f"the previous checkpoint {root / previous} is intact" if previous else "no earlier checkpoint exists"


def prune(root: Path, world: int, *, keep: int, best: str | None = None, mode: str = "max") -> list[str]:
    """Remove complete checkpoints beyond the newest `keep` (0 = keep all), sparing the one
    `latest` names and, with `best`, the one whose metrics.json scores best on that metric.
    Rank 0 only; returns the tags removed."""
    tags = sorted(
        (int(m.group(1)), p.name) for p in root.glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name)) and _complete(p, world)
    )
    if not keep or len(tags) <= keep:
        return []
    spared = {name for _, name in tags[-keep:]} | set(candidates(root, world)[:1])
    if best:
        scored = []
        for step, name in tags:
            try:
                value = json.loads((root / name / "metrics.json").read_text()).get(best)
            except (OSError, ValueError):
                value = None
            if isinstance(value, (int, float)):
                scored.append((value if mode == "max" else -value, step, name))  # ties: the newest
        if scored:
            spared.add(max(scored)[2])
    removed = [name for _, name in tags if name not in spared]
    for name in removed:
        shutil.rmtree(root / name, ignore_errors=True)
    if removed:
        log.info("checkpoints removed", kept=sorted(spared), removed=removed)
    return removed


def candidates(root: Path, world: int) -> list[str]:
    """Complete checkpoints, most trusted first: the one `latest` names, then by step, newest first."""
    tags = []
    pointer = root / "latest"
    if pointer.is_file():
        tag = pointer.read_text(errors="replace").strip()
        if re.fullmatch(r"step_\d+", tag) and _complete(root / tag, world):
            tags.append(tag)
    steps = sorted(
        ((int(m.group(1)), p.name) for p in root.glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name)) and _complete(p, world)),
        reverse=True,
    )
    return tags + [name for _, name in steps if name not in tags]


def written(root: Path) -> bool:
    """Whether any checkpoint folder `step_N/` exists under `root`, complete or not (a
    `.tmp-step_N/` one is a write that was cut short, not a checkpoint)."""
    return root.is_dir() and any(re.fullmatch(r"step_\d+", p.name) for p in root.iterdir())


def find_latest(root: Path, world: int) -> str | None:
    found = candidates(root, world)
    return found[0] if found else None


def load(ds_engine, root: Path, tag: str) -> tuple[dict, dict]:
    """Restore module + optimizer into the engine; return (shared client state, this rank's state).
    Raises `CheckpointError` naming the tensors when the checkpoint belongs to another model."""
    reshard.check_zero(root / tag, dist_engine.world_size(), ds_engine.zero_optimization_stage())
    try:
        _, client = ds_engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    except (RuntimeError, ValueError) as exc:
        text = str(exc)
        if "state_dict" in text or "parameter group" in text:
            raise CheckpointError(_mismatch(ds_engine, root / tag, text)) from None
        raise
    if client is None:
        raise FileNotFoundError(f"no loadable DeepSpeed checkpoint in {root / tag}")
    # Written by another number of processes: this rank's share of the slots and stream (reshard).
    rank_state = reshard.rank_state(root / tag, dist_engine.rank(), dist_engine.world_size(), ds_engine.train_batch_size())
    return client, rank_state


def load_newest(ds_engine, root: Path, world: int) -> tuple[str, dict, dict, list[str]]:
    """Load the newest checkpoint every rank can read -> (tag, shared state, this rank's state,
    the tags skipped). The ranks agree on each candidate, so all resume from the same one."""
    skipped: list[str] = []
    for tag in candidates(root, 1):  # written by any number of processes (reshard); a missing rank file fails its load
        try:
            client, mine = load(ds_engine, root, tag)
            reason = None
        except CheckpointError:
            raise
        except Exception as exc:  # truncated or corrupted files: torch and DeepSpeed raise many kinds
            client = mine = None
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        device = next(ds_engine.module.parameters()).device  # NCCL reduces CUDA tensors only
        failed = dist_engine.all_reduce_sum(torch.tensor([0.0 if reason is None else 1.0], device=device)).item()
        if not failed:
            if skipped:
                log.warning("resuming from an older checkpoint", checkpoint=str(root / tag), skipped=skipped)
            return tag, client, mine, skipped
        reason = reason or "unreadable on another rank"
        skipped.append(tag)
        log.warning("checkpoint cannot be loaded; trying an older one", checkpoint=str(root / tag), reason=reason)
    if skipped:
        raise CheckpointError(f"--resume: none of the checkpoints in {root} can be loaded (tried {', '.join(skipped)}); see the warnings above")
    partial = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
    hint = f" ({', '.join(partial)} lack the files of some of the {world} process(es): written by another number of processes?)" if partial else ""
    raise CheckpointError(f"--resume: no complete checkpoint in {root}{hint}")


def _mismatch(ds_engine, path: Path, text: str) -> str:
    """Which tensors differ between the checkpoint at `path` and the model being resumed."""
    head = f"checkpoint {path} was written for another model or optimizer, not the one this recipe builds"
    files = sorted(path.glob("*model_states.pt"))
    try:
        saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    except Exception:  # unreadable: fall back to torch's own message
        return f"{head}: {text.splitlines()[0][:500]}"
    detail = tensor_differences(ds_engine.module.state_dict(), saved) or text.splitlines()[0][:500]
    return f"{head}: {detail}. Resume it with the recipe it was written with, or start a new run with another --out"


def tensor_differences(own: dict, saved: dict) -> str:
    """The tensors whose shapes differ, that the checkpoint lacks, or that the model lacks, as
    one line ("" when the two state dicts fit). Also used by `dis eval` / `dis_core.load`."""
    shapes = [f"{k} (checkpoint {list(saved[k].shape)}, model {list(v.shape)})" for k, v in own.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    parts = []
    for label, names in (("shapes differ", shapes), ("missing from the checkpoint", missing), ("not in this model", unexpected)):
        if names:
            parts.append(f"{label}: {', '.join(names[:6])}" + (f" and {len(names) - 6} more" if len(names) > 6 else ""))
    return "; ".join(parts)
