"""The `arc` evaluator: undo each augmentation, vote over all variants of a test pair, pass@K.

Per test row (docs/reference.md#arc-evaluation): crop the last step's prediction at the first PAD/EOS
(the maximal-area rule), apply the inverse dihedral and the inverse colour map, and add one
vote for that grid under (test task, test pair), with confidence sigmoid(q_halt). Candidates
are ranked by (votes, mean confidence), ties by first appearance. A pair passes at K when its
true output is among the top K; a task scores the fraction of its pairs that pass (partial
credit, TRM) or 1 only if all pass (`all_or_nothing`, HRM). The true output is recovered from
the batch labels by the same inverse, so it never needs a separate copy of the answers.

`pass@K` is the mean over the test tasks *evaluated*: those with at least one prediction. Under
`train.eval_limit` (or any run that sees only part of the test split) the other tasks are left
out rather than scored 0, and `tasks_evaluated` / `tasks_total` report the coverage (a warning
is logged when it is below 100%). An evaluated task is scored over all its test pairs, so a pair
that got no prediction counts as missed; only the task where `eval_limit` cuts the split can
have such pairs (the split runs task -> variant -> pair, so a task's first variant covers all
its pairs).

`compute` also writes `submission.json` in the Kaggle layout: per task, one
{"attempt_1", "attempt_2"} per test pair, from the top two candidates that are non-empty grids
(the first repeated if only one). An empty grid (an all-PAD prediction crops to 0x0) is no valid
answer, so it is skipped for the next-ranked one; a pair with no non-empty candidate, or no
prediction at all, gets a 1x1 black grid [[0]]. pass@K ranks every candidate, empty ones
included, as the reference does (an empty grid never passes).
"""

from __future__ import annotations

import json
from pathlib import Path

import itertools

import attrs
import numpy as np
import structlog
import torch

from dis_core.contract.interfaces import IGNORE, EvalRecord

from .encoding import PAD, crop, grid_from_key, grid_key, invert

log = structlog.get_logger()


@attrs.frozen(kw_only=True)
class ArcEvalConfig:
    pass_ks: tuple[int, ...] = (1, 2, 5, 10, 100, 1000)
    all_or_nothing: bool = False  # HRM's rule: a task counts only if every test pair passes
    attempts: int = 2  # attempts per test pair in submission.json (Kaggle allows 2)
    write_submission: bool = True


class ArcEvaluator:
    """State: {(task, pair): {grid key: [votes, sum of confidences, first-seen order]}} plus the
    true output's key per pair; grid keys are shape bytes + cells, so grids rebuild from them."""

    headline = "pass@2"  # two attempts per test pair, as Kaggle scores and the papers report

    def __init__(self, config: ArcEvalConfig, test_puzzles: list[tuple[str, int]] | None = None):
        self.config = config
        self.test_puzzles = test_puzzles  # (task id, number of test pairs) per `arc_task`, from the task
        self.reset()

    def reset(self) -> None:
        self.votes: dict[tuple[int, int], dict[bytes, list]] = {}
        self.truth: dict[tuple[int, int], bytes] = {}
        self._seen = 0

    def update(self, record: EvalRecord) -> None:
        b = record.batch
        task, pair = b["arc_task"].tolist(), b["arc_pair"].tolist()
        tids, cmaps = b["aug_tid"].tolist(), b["aug_colors"].numpy()
        preds = crop(record.preds[:, -1].numpy())
        labels = b["labels"].numpy()
        labels = crop(np.where(labels == IGNORE, PAD, labels))
        conf = torch.sigmoid(record.q_halt.double()).tolist()
        blank = (b["puzzle_ids"] == 0).tolist()
        for r in range(len(task)):
            if task[r] < 0 or blank[r]:  # padding rows carry no vote
                continue
            key = (task[r], pair[r])
            if key not in self.truth:
                self.truth[key] = grid_key(invert(labels[r], tids[r], cmaps[r]))
            cand = self.votes.setdefault(key, {}).setdefault(grid_key(invert(preds[r], tids[r], cmaps[r])), [0, 0.0, self._seen])
            cand[0] += 1
            cand[1] += conf[r]
            self._seen += 1

    def state(self):
        return {"votes": self.votes, "truth": self.truth}

    def compute(self, states: list, out_dir: Path | None) -> dict[str, float]:
        votes: dict[tuple[int, int], dict[bytes, list]] = {}
        truth: dict[tuple[int, int], bytes] = {}
        offset = 0
        for st in states:  # rank order; first-seen order continues across ranks
            for key, cands in st["votes"].items():
                merged = votes.setdefault(key, {})
                for grid, (n, s, order) in cands.items():
                    c = merged.setdefault(grid, [0, 0.0, offset + order])
                    c[0] += n
                    c[1] += s
            truth.update(st["truth"])
            offset += 1 + max((o for c in st["votes"].values() for _, _, o in c.values()), default=0)
        ranked = {key: [g for g, _ in sorted(c.items(), key=lambda kv: (-kv[1][0], -kv[1][1] / kv[1][0], kv[1][2]))] for key, c in votes.items()}

        puzzles = self.test_puzzles
        if puzzles is None:  # no task list: score the tasks that were seen
            n_pairs: dict[int, int] = {}
            for t, p in votes:
                n_pairs[t] = max(n_pairs.get(t, 0), p + 1)
            puzzles = [(f"task{t}", n_pairs[t]) for t in sorted(n_pairs)]
        seen = {t for t, _ in votes}
        evaluated = [(t, n) for t, (_, n) in enumerate(puzzles) if t in seen]
        metrics = {}
        for k in self.config.pass_ks:
            scores = []
            for t, n in evaluated:
                hits = [(t, p) in ranked and truth[(t, p)] in ranked[(t, p)][:k] for p in range(n)]
                scores.append(float(all(hits)) if self.config.all_or_nothing else sum(hits) / max(1, n))
            metrics[f"pass@{k}"] = float(np.mean(scores)) if scores else 0.0
        metrics["tasks_evaluated"], metrics["tasks_total"] = float(len(evaluated)), float(len(puzzles))
        if len(evaluated) < len(puzzles):
            log.warning("arc pass@K is averaged over the evaluated subset of the test tasks only",
                        tasks_evaluated=len(evaluated), tasks_total=len(puzzles))
        if out_dir is not None and self.config.write_submission:
            write_submission(Path(out_dir) / "submission.json", puzzles, ranked, self.config.attempts)
        return metrics


def write_submission(path: Path, puzzles, ranked, attempts: int) -> None:
    out = {}
    for t, (name, n) in enumerate(puzzles):
        entries = []
        for p in range(n):
            non_empty = (g for g in ranked.get((t, p), []) if g[0] and g[1])  # keys open with (rows, cols)
            grids = [grid_from_key(g) for g in itertools.islice(non_empty, attempts)] or [[[0]]]  # a 1x1 black guess
            grids += [grids[0]] * (attempts - len(grids))
            entries.append({f"attempt_{i + 1}": g for i, g in enumerate(grids)})
        out[name] = entries
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))


def build_arc_evaluator(config: ArcEvalConfig, ctx) -> ArcEvaluator:
    """ARC voting over augmentations, pass@K and submission.json (needs the `arc` task's batch keys)."""
    return ArcEvaluator(config, getattr(ctx.task, "test_puzzles", None))
