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
import math
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
    true output's key per pair; grid keys are shape bytes + cells, so grids rebuild from them.

    The sum of confidences is kept exactly, as an integer count of 2**-1074 (every double is a
    whole multiple of it): states of any split of the examples (ranks, the per-batch partial
    results of a resumable `dis eval`) then merge to the very sum one pass would have, where float
    sums would differ in their last bits with the grouping and could flip a tie between two
    candidates with equal votes."""

    headline = "pass@2"  # two attempts per test pair, as Kaggle scores and the papers report

    def __init__(self, config: ArcEvalConfig, test_puzzles: list[tuple[str, int]] | None = None,
                 valid_puzzles: list[tuple[str, int]] | None = None):
        self.config = config
        self.test_puzzles = test_puzzles  # (task id, number of test pairs) per `arc_task`, from the task
        # The task's `valid_subset` tasks: their batches number them from `arc_task` len(test_puzzles)
        # on, so that one evaluator scores either split against the right task list.
        self.valid_puzzles = valid_puzzles or None
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
            cand = self.votes.setdefault(key, {}).setdefault(grid_key(invert(preds[r], tids[r], cmaps[r])), [0, 0, self._seen])
            cand[0] += 1
            cand[1] += exact(conf[r])
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
                    c = merged.setdefault(grid, [0, 0, offset + order])
                    c[0] += n
                    c[1] += s
            truth.update(st["truth"])
            offset += 1 + max((o for c in st["votes"].values() for _, _, o in c.values()), default=0)
        # The mean confidence as the correctly rounded double of the exact sum over the votes.
        ranked = {key: [g for g, _ in sorted(c.items(), key=lambda kv: (-kv[1][0], -(kv[1][1] / (kv[1][0] << EXACT_BITS)), kv[1][2]))]
                  for key, c in votes.items()}

        puzzles = self.test_puzzles
        if self.valid_puzzles and puzzles is not None and votes and min(t for t, _ in votes) >= len(puzzles):
            base, puzzles = len(puzzles), self.valid_puzzles  # the validation split: renumber its tasks from 0
            votes = {(t - base, p): c for (t, p), c in votes.items()}
            truth = {(t - base, p): k for (t, p), k in truth.items()}
            ranked = {(t - base, p): r for (t, p), r in ranked.items()}
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


EXACT_BITS = 1074  # 2**-1074, the smallest positive double, divides every double


def exact(x: float) -> int:
    """x as a whole number of 2**-1074: sums of these are exact, whatever their order."""
    if not math.isfinite(x):  # a NaN halting logit: no confidence to break a tie with
        return 0
    num, den = float(x).as_integer_ratio()  # den is a power of two, at most 2**1074
    return num * ((1 << EXACT_BITS) // den)


def select_test_examples(split, test_puzzles, tasks, num_aug: int | None):
    """The examples of ARC test split `split` that `dis eval --tasks/--num-aug` evaluates, in the
    split's own order (task, then variant, then test pair), so that each task's votes arrive in
    the order the full evaluation gives them and its first-seen tie-breaks agree. `tasks`: None
    (all), a count N (the first N test tasks) or task ids; `num_aug`: the original plus the first
    `num_aug` augmentations of each test pair (None: all the split holds). Returns (indices,
    coverage): coverage says which tasks, how many variants and examples were chosen."""
    from dis_core.contract.errors import UserError

    names = [name for name, _ in test_puzzles]
    if tasks is None:
        chosen = list(range(len(names)))
    elif isinstance(tasks, int):
        if not 1 <= tasks <= len(names):
            raise UserError(f"--tasks {tasks}: the test split holds {len(names)} task(s)")
        chosen = list(range(tasks))
    else:
        where = {name: t for t, name in enumerate(names)}
        unknown = [t for t in tasks if t not in where]
        if unknown:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise UserError(f"--tasks: unknown test task id(s) {', '.join(map(repr, unknown))}; the test split holds "
                            f"{len(names)} task(s): {shown}")
        chosen = sorted({where[t] for t in tasks})  # split order, each task once
    if not hasattr(split, "n_var") or not hasattr(split, "offset"):
        raise UserError("--tasks/--num-aug need the arc task's own test split (not task.config.reference_dir)")
    n_test = split.corpus.n_test[split.group_puzzle]
    most = int(split.n_var.max()) - 1 if len(split.n_var) else 0
    if num_aug is not None and not 0 <= num_aug <= most:
        raise UserError(f"--num-aug {num_aug}: the test split holds at most {most} augmentation(s) per test pair "
                        f"(task.config.num_augmentations, eval_variants)")
    indices, variants = [], []
    for t in chosen:  # positions in the split, which lists its tasks in `test_puzzles` order
        n_var = int(split.n_var[t]) if num_aug is None else min(int(split.n_var[t]), num_aug + 1)
        indices.append(int(split.offset[t]) + np.arange(n_var * int(n_test[t])))  # variant-major: a prefix
        variants.append(n_var)
    idx = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    coverage = {"tasks": [names[t] for t in chosen], "tasks_total": len(names), "num_aug": num_aug,
                "variants_per_pair": {"min": min(variants), "max": max(variants)},
                "examples": int(len(idx)), "examples_total": int(len(split))}
    return idx.astype(np.int64), coverage


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
    return ArcEvaluator(config, getattr(ctx.task, "test_puzzles", None), getattr(ctx.task, "valid_puzzles", None))
