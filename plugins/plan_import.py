"""Target generator `plan_import`: intermediate answers written by an external planner (an LLM,
a program, a person), read from a JSONL file keyed by example id. docs/plan_format.md
describes the file.

Each plan is validated when the generator is built (shape, vocabulary, last step == y* on the
supervised cells; errors name the file and line), then resampled to n_sup frames: frame j
(0-based) is plan step ceil((j+1) * K / n_sup) - 1 of K, so the last frame is always the last
step, a longer plan is subsampled evenly and a shorter one repeats steps. Examples without a
plan get another generator's targets (`on_missing = "fallback"`) or fail the run ("error").
Plans need not move monotonically towards y*; `report()` says how far each frame is from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import structlog
import torch

from dis_core import hookimpl
from dis_core.contract.errors import DataError
from dis_core.contract.interfaces import IGNORE

log = structlog.get_logger()
_KEYS = {"example_id", "split", "steps", "meta"}  # "meta": free-form, ignored


def resample_index(num_steps: int, n_sup: int) -> np.ndarray:
    """(n_sup,) plan step shown at each frame: ceil((j+1) * K / n_sup) - 1."""
    j = np.arange(1, n_sup + 1)
    return (j * num_steps + n_sup - 1) // n_sup - 1


def _distance(steps: np.ndarray, y: np.ndarray) -> np.ndarray:
    """steps (K, L), y (L,) -> (K,) supervised cells where a step is not y* (unset cells count)."""
    supervised = y != IGNORE
    return ((steps != y[None, :]) & supervised[None, :]).sum(1)


@attrs.frozen(kw_only=True)
class PlanImportConfig:
    path: Path  # JSONL file of plans; in a recipe, relative to the recipe file
    split: Literal["train", "test"] = "train"  # records for the other split are skipped (and counted)
    on_missing: Literal["fallback", "error"] = "fallback"  # what examples without a plan get
    fallback: str = "reveal_path"  # any registered target generator, for examples without a plan
    fallback_config: dict[str, Any] = attrs.field(factory=dict)  # its config table


class PlanImport:
    """Targets from imported plans; `fallback` (any TargetGenerator) serves the rest."""

    monotone = False  # not guaranteed: see report()["monotone_share"]

    def __init__(self, path: Path, ids: np.ndarray, plans: list[np.ndarray], n_sup: int, *,
                 fallback=None, on_missing: str = "fallback", split: str = "train", skipped: int = 0,
                 labels: np.ndarray | None = None):
        order = np.argsort(ids)
        self.path, self.split, self.on_missing, self.fallback = path, split, on_missing, fallback
        self.ids = np.asarray(ids, dtype=np.int64)[order]  # sorted, for searchsorted look-ups
        self.plans = [plans[i] for i in order]  # each (K_i, L) int64, IGNORE where unsupervised
        self.labels = None if labels is None else labels[order]
        self.skipped, self.n_sup = skipped, n_sup
        self._frames: dict[int, torch.Tensor] = {}
        self.served = {"planned": 0, "fallback": 0}

    def frames(self, n_sup: int) -> torch.Tensor:
        """(P, n_sup, L) int64 resampled plans, cached per n_sup."""
        if n_sup not in self._frames:
            stacked = [p[resample_index(len(p), n_sup)] for p in self.plans]
            empty = torch.empty(0, n_sup, 0, dtype=torch.int64)
            self._frames[n_sup] = torch.from_numpy(np.stack(stacked)) if stacked else empty
        return self._frames[n_sup]

    def __call__(self, batch, n_sup: int, generator: torch.Generator) -> torch.Tensor:
        labels = batch["labels"]
        B, L = labels.shape
        ids = batch["example_ids"].cpu().numpy()
        row = np.searchsorted(self.ids, ids).clip(max=max(len(self.ids) - 1, 0))
        has = (self.ids[row] == ids) if len(self.ids) else np.zeros(B, dtype=bool)
        out = torch.empty(B, n_sup, L, dtype=torch.int64, device=labels.device)
        if has.any():
            out[torch.from_numpy(has).to(labels.device)] = self.frames(n_sup)[torch.from_numpy(row[has])].to(labels.device)
        if not has.all():
            missing = ids[~has]
            if self.on_missing == "error" or self.fallback is None:
                raise DataError(
                    f"plan_import: {self.path} has no plan for {self.split} example id(s) "
                    f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''} (on_missing = \"error\")"
                )
            keep = torch.from_numpy(~has).to(labels.device)
            sub = {k: v[keep] for k, v in batch.items() if torch.is_tensor(v) and v.shape[:1] == (B,)}
            out[keep] = self.fallback(sub, n_sup, generator).to(out.device, torch.int64)
        self.served["planned"] += int(has.sum())
        self.served["fallback"] += int((~has).sum())
        return out

    def report(self) -> dict[str, Any]:
        """How the plans approach y*: per-frame mean Hamming distance (after resampling to
        n_sup), the share of plans whose distance never grows (over their own steps), sizes."""
        lengths = [len(p) for p in self.plans]
        out: dict[str, Any] = {"path": str(self.path), "split": self.split, "plans": len(self.plans),
                               "skipped_other_split": self.skipped, **{f"served_{k}": v for k, v in self.served.items()}}
        if not self.plans or self.labels is None:
            return out
        raw = [_distance(p, y) for p, y in zip(self.plans, self.labels)]
        frames = self.frames(self.n_sup).numpy()
        per_frame = np.stack([_distance(f, y) for f, y in zip(frames, self.labels)])  # (P, n_sup)
        out.update(
            steps_mean=float(np.mean(lengths)), steps_min=int(min(lengths)), steps_max=int(max(lengths)),
            per_step_mean_distance=[float(v) for v in per_frame.mean(0)],
            monotone_share=float(np.mean([bool((np.diff(d) <= 0).all()) for d in raw])),
        )
        return out


def _parse_step(step: Any, shape: tuple[int, int] | None, L: int, vocab: int, where: str, k: int) -> np.ndarray:
    if isinstance(step, list) and step and isinstance(step[0], list):  # nested rows
        if shape is None or len(step) != shape[0] or any(not isinstance(r, list) or len(r) != shape[1] for r in step):
            want = f"{shape[0]} rows of {shape[1]}" if shape else "a flat list (this task has no grid shape)"
            raise DataError(f"{where}: step {k} must be {want} tokens, or a flat list of {L}")
        step = [v for r in step for v in r]
    if not isinstance(step, list) or len(step) != L:
        raise DataError(f"{where}: step {k} must hold {L} tokens (flat, or as rows), got "
                        f"{len(step) if isinstance(step, list) else type(step).__name__}")
    arr = np.array([IGNORE if v is None else v for v in step], dtype=object)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in arr):
        raise DataError(f"{where}: step {k} holds something other than integer tokens or null")
    arr = arr.astype(np.int64)
    bad = (arr != IGNORE) & ((arr < 0) | (arr >= vocab))
    if bad.any():
        raise DataError(f"{where}: step {k} cell {int(np.argmax(bad))} has token {int(arr[bad][0])}, "
                        f"outside the vocabulary 0..{vocab - 1}")
    return arr


def load_plans(path: Path, task, spec, split: str):
    """Read and validate every record -> (ids, plans, labels, skipped)."""
    L, vocab, shape = spec.seq_len, spec.vocab_size, spec.grid_shape
    records, first_line, skipped, lines = [], {}, 0, 0
    with path.open() as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            lines += 1
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: each line must be a JSON object with example_id and steps")
            extra = sorted(set(rec) - _KEYS)
            if extra:
                raise DataError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(_KEYS))}")
            eid, rec_split, steps = rec.get("example_id"), rec.get("split", "train"), rec.get("steps")
            if not isinstance(eid, int) or isinstance(eid, bool) or eid < 0:
                raise DataError(f"{where}: example_id must be a non-negative integer, got {eid!r}")
            if rec_split not in ("train", "test"):
                raise DataError(f"{where}: split must be \"train\" or \"test\", got {rec_split!r}")
            if not isinstance(steps, list) or not steps:
                raise DataError(f"{where}: steps must be a non-empty list of grids")
            if rec_split != split:
                skipped += 1
                continue
            if eid in first_line:
                raise DataError(f"{where}: a second plan for {split} example {eid} (the first is on line {first_line[eid]})")
            first_line[eid] = lineno
            plan = np.stack([_parse_step(s, shape, L, vocab, where, k) for k, s in enumerate(steps)])
            records.append((eid, plan, where))
    if not lines:  # a file cut short or never written: without this, every example would silently fall back
        raise DataError(f"{path}: the plan file holds no plans (no lines); write one JSON object per line "
                        f"(docs/plan_format.md)")
    if not records:
        return np.zeros(0, dtype=np.int64), [], None, skipped
    dataset = task.dataset(split)
    for eid, _, where in records:  # Python ints: an id too big for int64 is simply out of range
        if eid >= len(dataset):
            raise DataError(f"{where}: example_id {eid} is outside the {split} split (it has {len(dataset)} examples)")
    ids = np.array([r[0] for r in records], dtype=np.int64)
    labels = np.asarray(dataset.get(ids)["labels"], dtype=np.int64)  # (P, L)
    plans = []
    for (eid, plan, where), y in zip(records, labels):
        supervised = y != IGNORE
        wrong = (plan[-1] != y) & supervised
        if wrong.any():
            raise DataError(f"{where}: the last step differs from the answer y* of example {eid} on "
                            f"{int(wrong.sum())} supervised cell(s), the first at cell {int(np.argmax(wrong))}")
        plans.append(np.where(supervised[None, :], plan, IGNORE))  # plans speak only of supervised cells
    return ids, plans, labels, skipped


def build_plan_import(config: PlanImportConfig, ctx) -> PlanImport:
    """Targets from an external planner's JSONL file (docs/plan_format.md), with a fallback."""
    path = Path(config.path).expanduser().absolute()  # a recipe's path is absolute already
    if path.is_dir():
        ctx.fail(f"plan file {path} is a directory, not a JSONL file", at="config.path")
    if not path.is_file():
        ctx.fail(f"plan file {path} not found", at="config.path")
    ids, plans, labels, skipped = load_plans(path, ctx.task, ctx.spec, config.split)
    fallback = None
    if config.on_missing == "fallback":
        fallback = ctx.build("target_generator", config.fallback, config.fallback_config,
                             at="config.fallback", config_at="config.fallback_config")
    gen = PlanImport(path, ids, plans, ctx.n_sup, fallback=fallback, on_missing=config.on_missing,
                     split=config.split, skipped=skipped, labels=labels)
    rep = gen.report()
    log.info("plans imported", **{k: v for k, v in rep.items() if not k.startswith("served")})
    return gen


@hookimpl
def register_target_generators(register):
    register("plan_import", PlanImportConfig, build_plan_import)
