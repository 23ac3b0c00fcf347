"""Evaluating a model on a test split: every evaluator over every (or the first `limit`) example.

Shared by the trainer's periodic evaluation and by anything that scores a checkpoint. Each rank
takes its slice of every test batch (`dis_core.step.data.eval_chunks`), runs `supervision.rollout`
from a fresh state, and feeds its evaluators; rank 0 merges the evaluators' states.

Besides the evaluators' metrics, every evaluation reports `diagnostics/*`: the mean steps and
network calls an example got (they vary with an adaptive halting rule) and, with `margin`, the
Advantage Margin per step (paper Prop. 4.1). A guidance sweep (`guidance`, paper Eq. 5) scores
each w in the same pass: one more rollout per batch for each w != 1, scored by fresh copies of
the evaluators, its metrics named `<evaluator>/<metric>@w=<w>` (w = 1 reuses the plain rollout).

A long evaluation can keep partial results (`PartialResults`, `dis eval`): each batch is scored
by freshly reset evaluators whose states are written, one file per batch (and rank), as the batch
ends; a rerun with as many processes skips the batches on disk, and the metrics come from every
batch's (and rank's) state, merged as the ranks' states are merged. An evaluator's
`compute(states)` already merges the states of disjoint slices of the data (one per rank), so
this asks nothing new of it; the metrics are those of the batch-wise merge both for a run that
went through and for one resumed after a kill, bit for bit. `Subset` evaluates chosen examples of a split (`dis eval --tasks/--num-aug`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import time
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import structlog
import torch

from dis_core.loop import engine as dist
from dis_core.step.data import eval_chunks, fetch
from dis_core.step.diagnostics import RolloutDiagnostics
from dis_core.contract.interfaces import EvalRecord
from dis_core.contract.errors import UserError
from dis_core.contract.logs import in_words, progress
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
             guidance: Sequence[float] = (), readout: str = "step", margin: bool = False,
             partial: "PartialResults | None" = None, report: Callable[[str], None] | None = None) -> dict[str, float]:
    """The `solver`'s evaluators over `dataset`: `<evaluator>/<metric>` and `diagnostics/<metric>`
    metrics on rank 0 ({} elsewhere). The caller sets eval mode (`solver.evaluating()`, and swaps
    in EMA weights); `out_dir(name)` is where evaluator `name` may write files; `check`
    (`dis_core.contract.checks.Boundary.batch`) checks each test batch against the task's spec.
    `guidance`: the w values to score besides the plain evaluation (w = 1); `readout`: "step" or
    "cycle" (see `supervision.rollout`); `margin`: the Advantage Margin rows, dropped if the
    backbone cannot read out before the step (with a warning, once per backbone). `partial`: keep
    and reuse per-batch results there (every rank opens it, each writes its own batches' slices);
    `report(line)`: told how many examples are left before the first batch, and the time they
    should take after it."""
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
    n_batches = math.ceil(size / batch_size)
    done = partial.done_everywhere(n_batches) if partial is not None else set()  # skipped: on every rank's disk
    mine = partial.done() if partial is not None else set()  # skipped by this rank: it got further before a kill
    in_batch = [min(batch_size, size - b * batch_size) for b in range(n_batches)]  # examples, all ranks together
    left = sum(n for b, n in enumerate(in_batch) if b not in done)
    if report is not None and rank == 0:
        report(f"{left} example(s) to evaluate in {n_batches - len(done)} batch(es) of {batch_size}"
               + (f" ({len(done)} batch(es) done before, read from {partial.folder})" if done else ""))
    timed = False
    with progress(n_batches, "eval", rank=rank, unit="batch", initial=len(done)) as bar:
        for b, (idx, n_real) in enumerate(eval_chunks(size, batch_size, rank, world)):
            if b in done:
                continue
            if b in mine:
                bar.update(1)
                continue
            if partial is not None:  # this batch's own states, written as it ends
                for evs in sets.values():
                    for ev in evs.values():
                        ev.reset()
                diags = {key: RolloutDiagnostics(calls) for key in sets}
            started = time.perf_counter()
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
            if partial is not None:
                partial.save(b, {key: {**{n: ev.state() for n, ev in evs.items()}, "diagnostics": diags[key].state()}
                                 for key, evs in sets.items()})
            if report is not None and not timed and rank == 0:  # the ranks take a batch's slices side by side
                timed, left = True, left - in_batch[b]
                seconds = time.perf_counter() - started
                if left:
                    report(f"first batch: {seconds:.1f} s; the {left} example(s) left should take "
                           f"{in_words(seconds * left / max(1, in_batch[b]))} on this {solver.device.type}")
            bar.update(1)
    saved = partial.merged(n_batches) if partial is not None else None  # on rank 0
    metrics: dict[str, float] = {}
    for key, evs in sets.items():
        suffix = "" if key is None else guidance_suffix(key)
        named = {**evs, "diagnostics": diags[key]}
        for name, ev in named.items():
            # batch order: the order a single pass would have met the examples in
            if partial is not None:
                states = [part[key][name] for part in saved] if saved is not None else None
            else:
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


class Subset:
    """The examples `indices` of `dataset`, in that order, as a dataset of its own: every key of a
    batch as the dataset gives it (evaluators see each example as a full evaluation shows it)
    but `example_ids`, which a dataset's contract makes the positions asked for."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        arrays = dict(self.dataset.get(self.indices[idx]))
        arrays["example_ids"] = idx.copy()
        return arrays


PARTIAL_FORMAT = 1
_BATCH_FILE = re.compile(r"batch_(\d{6,})\.pkl")  # a lone process's
_RANK_BATCH_FILE = re.compile(r"batch_(\d{6,})\.rank(\d+)\.pkl")  # one rank's, under a launcher


class PartialResults:
    """Per-batch evaluator states of one evaluation, in `folder`: `manifest.json` (what was
    evaluated: the weights' digest and every setting that changes a batch's result, the number
    of processes among them) and one file per finished batch and process, `batch_NNNNNN.pkl` for
    a lone process and `batch_NNNNNN.rankR.pkl` for rank R of several, each written to a
    temporary name and renamed, so a kill leaves whole files only. A folder whose manifest differs
    is refused, never merged.

    Every rank opens the same folder and writes only its own files; rank 0 merges. The ranks agree
    (one collective each) on whether the manifest fits, on which batches every rank has, and on
    whether every rank could read its files, so that a refusal stops each of them with exit
    status 2, not one rank with the others waiting for it. The folder need not be shared: a rank
    that does not see rank 0's manifest writes its own copy, and rank 0 gathers the states."""

    def __init__(self, folder: Path, identity: dict, *, device: torch.device | None = None):
        self.folder = Path(folder)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = device if device is not None else torch.device("cpu")  # where a collective's tensor goes (nccl: cuda)
        self.reused = 0  # batches every rank had on disk, set by `done_everywhere`
        identity = json.loads(json.dumps({"format": PARTIAL_FORMAT, **identity}))  # as it reads back
        self.manifest = self.folder / "manifest.json"
        # Rank 0 first: a new manifest is written by it alone, then read by the others.
        try:
            self._agree(self._open(identity) if self.rank == 0 else None)
        except UserError:
            if self.rank != 0 and self.manifest.exists():  # rank 0 refused it: say why here too (this only reads)
                own = self._open(identity)
                if own is not None:
                    raise own from None
            raise
        if self.world > 1:
            self._agree(self._open(identity) if self.rank != 0 else None)
        self.identity = identity

    def _open(self, identity: dict) -> UserError | None:
        """Check `identity` against the manifest, or write a new one; the refusal, if any."""
        if self.manifest.exists():
            try:
                saved = json.loads(self.manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                return UserError(f"{self.manifest}: unreadable partial results ({exc}); remove {self.folder} to start over")
            differ = sorted(k for k in {**saved, **identity} if saved.get(k) != identity.get(k)) if isinstance(saved, dict) else ["format"]
            if differ:
                hint = (" (written by another number of processes: a batch's slices, so its result, depend on it; "
                        "rerun with as many processes as it names)") if "world_size" in differ else ""
                return UserError(f"{self.manifest}: partial results of another evaluation (it differs in {', '.join(differ)})"
                                 f"{hint}; they are not merged. Pass another --out, or remove {self.folder} to start over")
            return None
        from dis_core.outputs.rundir import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.manifest, json.dumps(identity, indent=1, sort_keys=True) + "\n")
        return None

    def _agree(self, error: UserError | None) -> None:
        """Raise on every rank if any rank has `error` (a lone process: raise it)."""
        failed = error is not None
        if self.world > 1:
            failed = bool(dist.all_reduce_sum(torch.tensor([int(failed)], dtype=torch.int32, device=self.device)).item())
        if error is not None:
            raise error
        if failed:
            raise UserError(f"{self.manifest}: another process refused these partial results (its own message says why); "
                            f"they are not merged. Pass another --out, or remove {self.folder} to start over")

    def _path(self, b: int) -> Path:
        return self.folder / (f"batch_{b:06d}.pkl" if self.world == 1 else f"batch_{b:06d}.rank{self.rank}.pkl")

    def done(self) -> set[int]:
        """The batches this rank has on disk."""
        if self.world == 1:
            return {int(m.group(1)) for p in self.folder.iterdir() if (m := _BATCH_FILE.fullmatch(p.name))}
        return {int(m.group(1)) for p in self.folder.iterdir()
                if (m := _RANK_BATCH_FILE.fullmatch(p.name)) and int(m.group(2)) == self.rank}

    def done_everywhere(self, n_batches: int) -> set[int]:
        """The batches every rank has on disk (a collective): those an evaluation skips. A rank
        may have more (it got further before the kill); it keeps them and skips them too."""
        mine = self.done()
        extra = sorted(b for b in mine if b >= n_batches)
        # The manifest fixes the batch count: such a file was put there by hand.
        self._agree(UserError(f"{self._path(extra[0])}: a batch this evaluation does not have ({n_batches} batches); "
                              f"remove {self.folder} to start over") if extra else None)
        if self.world == 1:
            found = mine
        else:
            have = torch.zeros(n_batches, dtype=torch.int32, device=self.device)
            have[sorted(mine)] = 1
            counts = dist.all_reduce_sum(have).cpu()
            found = {int(b) for b in torch.nonzero(counts == self.world).flatten()}
        self.reused = len(found)
        return found

    def save(self, b: int, states: dict) -> None:
        path = self._path(b)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_bytes(pickle.dumps(states, protocol=pickle.HIGHEST_PROTOCOL))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_all(self, n_batches: int) -> list[dict]:
        """This rank's states of batches 0..n_batches-1, in batch order."""
        parts = []
        for b in range(n_batches):
            try:
                parts.append(pickle.loads(self._path(b).read_bytes()))
            except (OSError, pickle.UnpicklingError, EOFError) as exc:
                raise UserError(f"{self._path(b)}: partial result unreadable ({type(exc).__name__}); remove it and "
                                f"rerun to evaluate that batch again") from None
        return parts

    def merged(self, n_batches: int) -> list[dict] | None:
        """On rank 0, every rank's batch states in the order a lone pass meets the examples:
        batch by batch, rank by rank within a batch (`eval_chunks` gives rank r the r-th slice);
        None on the other ranks. Each rank reads its own files, and rank 0 gathers them."""
        parts, error = None, None
        try:
            parts = self.load_all(n_batches)
        except UserError as exc:
            error = exc
        self._agree(error)
        ranks = dist.gather_objects(parts) if self.world > 1 else [parts]
        if ranks is None:
            return None
        return [ranks[r][b] for b in range(n_batches) for r in range(self.world)]
