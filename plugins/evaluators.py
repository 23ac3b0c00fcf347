"""Evaluator `exact`: token and sequence accuracy and the per-step path to y*, for any task.
(Task-specific evaluators live beside their task, e.g. `nqueens` in tasks/nqueens.py.)

The prediction of an example is its argmax after its last step run (`steps`); per-step figures
count an example at step s only if it ran step s.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from dis_core import hookimpl
from dis_core.contract.interfaces import IGNORE, EvalRecord
from dis_core.contract.metrics import Tally, final_and_ran


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
        self.tally = Tally("count", "acc_sum", "exact", "pairs", "improving", "non_worsening")

    def update(self, record: EvalRecord) -> None:
        y = record.batch["labels"]  # (B, L)
        final, ran = final_and_ran(record)
        sup = y != IGNORE
        real = sup.any(-1)
        y, sup, final, ran, preds = y[real], sup[real], final[real], ran[real], record.preds[real]
        cells = sup.sum(-1)  # (B,)
        right = ((final == y) & sup).sum(-1)
        dist = ((preds != y[:, None, :]) & sup[:, None, :]).sum(-1)  # (B, N) Hamming after each step
        both = ran[:, 1:]  # step s ran implies step s-1 ran
        delta = dist[:, 1:] - dist[:, :-1]  # (B, N-1)
        self.tally.add(
            count=real.sum(), acc_sum=float((right / cells).sum()), exact=(right == cells).sum(),
            ham_sum=(dist * ran).sum(0), ham_count=ran.sum(0),
            pairs=both.sum(), improving=((delta < 0) & both).sum(), non_worsening=((delta <= 0) & both).sum(),
        )

    def state(self) -> dict:
        return self.tally.state()

    def compute(self, states: list, out_dir: Path | None) -> dict[str, float]:
        t = Tally.merged(states)
        if not t["count"]:
            return {"count": 0.0}
        out = {"count": float(t["count"]), "accuracy": t.ratio("acc_sum", "count"), "exact_accuracy": t.ratio("exact", "count")}
        out.update(t.per_step("hamming", "ham_sum", "ham_count"))
        if t["pairs"]:
            out["improving_steps"] = t.ratio("improving", "pairs")
            out["non_worsening_steps"] = t.ratio("non_worsening", "pairs")
        return out


def build_exact(config: ExactConfig, ctx) -> ExactEvaluator:
    """Token accuracy, exact match, and per-step Hamming distance to y*."""
    return ExactEvaluator()


@hookimpl
def register_evaluators(register):
    register("exact", ExactConfig, build_exact)
