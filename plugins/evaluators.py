"""Evaluators `exact` (token/sequence accuracy and the per-step path to y*) and `nqueens`
(valid-solution rate: N-Queens puzzles with few givens have several solutions).

States are dicts of Python numbers and per-step lists (index s-1 = step s), so they pickle
small and merge by addition. The prediction of an example is its argmax after its last step
run (`steps`); per-step figures count an example at step s only if it ran step s.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch

from dis_core import hookimpl
from dis_core.errors import CapabilityError
from dis_core.interfaces import IGNORE, EvalRecord
from dis_plugins.tasks.nqueens import valid_solutions


def _final_and_ran(record: EvalRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) prediction after each example's last step, (B, N) bool: step s was run."""
    preds = record.preds  # (B, N, L)
    n = preds.shape[1]
    last = record.steps.long().clamp(1, n) - 1  # (B,)
    final = preds[torch.arange(preds.shape[0]), last]
    ran = torch.arange(n)[None, :] <= last[:, None]  # (B, N)
    return final, ran


def _add(a: list, b: list) -> list:
    """Element-wise sum of per-step lists that may differ in length."""
    out = list(a) + [0] * max(0, len(b) - len(a))
    for i, v in enumerate(b):
        out[i] += v
    return out


def _merge(states: list[dict]) -> dict:
    total: dict = {}
    for st in states:
        for key, v in st.items():
            if isinstance(v, list):
                total[key] = _add(total.get(key, []), v)
            else:
                total[key] = total.get(key, 0) + v
    return total


def _per_step(name: str, sums: list, counts: list) -> dict[str, float]:
    return {f"{name}@{s + 1}": sums[s] / counts[s] for s in range(len(counts)) if counts[s]}


# ----------------------------------------------------------------------------- exact


@attrs.frozen(kw_only=True)
class ExactConfig:
    """No options: compares every supervised cell (labels != IGNORE) with y*."""


class ExactEvaluator:
    """`accuracy` is the mean over examples of each example's share of right cells (the
    reference's `accuracy`, which weighs examples, not cells); `exact_accuracy` the share of
    examples with every cell right; `hamming@s` the mean number of wrong cells after step s;
    `improving_steps` / `non_worsening_steps` the share of (example, step s >= 2) pairs whose
    distance to y* fell strictly / did not grow. Examples without supervised cells are skipped."""

    headline = "exact_accuracy"

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._st = {"count": 0, "acc_sum": 0.0, "exact": 0, "ham_sum": [], "ham_count": [],
                    "pairs": 0, "improving": 0, "non_worsening": 0}

    def update(self, record: EvalRecord) -> None:
        y = record.batch["labels"]  # (B, L)
        final, ran = _final_and_ran(record)
        sup = y != IGNORE
        real = sup.any(-1)
        y, sup, final, ran, preds = y[real], sup[real], final[real], ran[real], record.preds[real]
        cells = sup.sum(-1)  # (B,)
        right = ((final == y) & sup).sum(-1)
        dist = ((preds != y[:, None, :]) & sup[:, None, :]).sum(-1)  # (B, N) Hamming after each step
        st = self._st
        st["count"] += int(real.sum())
        st["acc_sum"] += float((right / cells).sum())
        st["exact"] += int((right == cells).sum())
        st["ham_sum"] = _add(st["ham_sum"], (dist * ran).sum(0).tolist())
        st["ham_count"] = _add(st["ham_count"], ran.sum(0).tolist())
        both = ran[:, 1:]  # step s ran implies step s-1 ran
        delta = dist[:, 1:] - dist[:, :-1]  # (B, N-1)
        st["pairs"] += int(both.sum())
        st["improving"] += int(((delta < 0) & both).sum())
        st["non_worsening"] += int(((delta <= 0) & both).sum())

    def state(self) -> dict:
        return dict(self._st)

    def compute(self, states: list, out_dir: Path | None) -> dict[str, float]:
        st = _merge(states)
        count = st.get("count", 0)
        if not count:
            return {"count": 0.0}
        out = {"count": float(count), "accuracy": st["acc_sum"] / count, "exact_accuracy": st["exact"] / count}
        out.update(_per_step("hamming", st["ham_sum"], st["ham_count"]))
        if st["pairs"]:
            out["improving_steps"] = st["improving"] / st["pairs"]
            out["non_worsening_steps"] = st["non_worsening"] / st["pairs"]
        return out


def build_exact(config: ExactConfig, ctx) -> ExactEvaluator:
    """Token accuracy, exact match, and per-step Hamming distance to y*."""
    return ExactEvaluator()


# ----------------------------------------------------------------------------- nqueens


@attrs.frozen(kw_only=True)
class NQueensEvalConfig:
    """No options: the board size comes from the task's grid_shape."""


class NQueensEvaluator:
    """`valid_solution_rate`: the final board is well formed (only empty/queen tokens), holds
    exactly N queens, no two attacking, and keeps every given queen. `exact_accuracy` matches
    the one sampled label solution, which undercounts when several solutions exist.
    `valid@s` is the valid rate after step s."""

    headline = "valid_solution_rate"

    def __init__(self, board_size: int):
        self.n = board_size
        self.reset()

    def reset(self) -> None:
        self._st = {"count": 0, "valid": 0, "exact": 0, "valid_sum": [], "valid_count": []}

    def update(self, record: EvalRecord) -> None:
        x, y = record.batch["inputs"], record.batch["labels"]
        final, ran = _final_and_ran(record)
        preds = record.preds  # (B, N, L)
        b, n_steps, length = preds.shape
        valid_each = valid_solutions(preds.reshape(b * n_steps, length), x.repeat_interleave(n_steps, 0), self.n)
        valid_each = valid_each.reshape(b, n_steps) & ran  # (B, N)
        st = self._st
        st["count"] += b
        st["valid"] += int(valid_solutions(final, x, self.n).sum())
        st["exact"] += int(((final == y) | (y == IGNORE)).all(-1).sum())
        st["valid_sum"] = _add(st["valid_sum"], valid_each.sum(0).tolist())
        st["valid_count"] = _add(st["valid_count"], ran.sum(0).tolist())

    def state(self) -> dict:
        return dict(self._st)

    def compute(self, states: list, out_dir: Path | None) -> dict[str, float]:
        st = _merge(states)
        count = st.get("count", 0)
        if not count:
            return {"count": 0.0}
        out = {"count": float(count), "valid_solution_rate": st["valid"] / count, "exact_accuracy": st["exact"] / count}
        out.update(_per_step("valid", st["valid_sum"], st["valid_count"]))
        return out


def build_nqueens_evaluator(config: NQueensEvalConfig, ctx) -> NQueensEvaluator:
    """N-Queens valid-solution rate (no attacks, N queens, givens kept) and exact match."""
    spec = ctx.spec if ctx.spec is not None else getattr(ctx.task, "spec", None)
    shape = getattr(spec, "grid_shape", None)
    if shape is None or shape[0] != shape[1] or shape[0] * shape[1] != spec.seq_len:
        raise CapabilityError(
            f"{ctx.component or 'evaluator nqueens'}: needs a task with a square grid_shape covering the "
            f"whole sequence (got grid_shape={shape}); use it with task 'nqueens'"
        )
    return NQueensEvaluator(shape[0])


@hookimpl
def register_evaluators(register):
    register("exact", ExactConfig, build_exact)
    register("nqueens", NQueensEvalConfig, build_nqueens_evaluator)
