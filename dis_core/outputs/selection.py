"""Which examples to show and what the task says of a model's answer to them: the `--examples`
choice of `dis eval --trajectories`, `train.eval_trajectories` (dis_core/outputs/trajectories.py), `dis show`
and `dis check` (dis_core/tools/kit.py), and the verdict the trajectory pictures are titled with.

Choices: `random` (seed 0 unless `random:SEED`), `failures` (examples the verdict rejects, among up to
`POOL` drawn at random; needs a model's answers, so `trajectories.run_examples` picks them),
`hardest` (most cells of the question to change, among up to `POOL` drawn at random), `first`, and
`ids:3,17,42`.

The verdict (`verdicts`) is the task's own: the recipe's evaluator whose headline metric is a
validity check (`nqueens`, `sudoku`: valid_solution_rate; several solutions may be valid), else its
first evaluator, scoring the example alone; without an evaluator that can, exact match with the
reference on the supervised cells.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import attrs
import numpy as np
import torch
from structlog.testing import capture_logs

from dis_core.contract.compat import headline_of
from dis_core.step.data import fetch
from dis_core.step.diagnostics import sample_indices
from dis_core.contract.errors import UserError
from dis_core.contract.interfaces import IGNORE, AnswerCheckingTask, EvalRecord
from dis_core.step.supervision import Rollout

POOL = 512  # most examples `failures` and `hardest` look through
DEFAULT = "random"
CHOICES = "failures, random, random:SEED, hardest, first or ids:3,17,42"


@attrs.frozen
class Choice:
    """Which examples of a split to show; `Choice.parse("ids:3,17")` reads `--examples`."""

    how: str  # "random", "failures", "hardest", "first" or "ids"
    seed: int = 0  # of the random draw (random, and the pool of failures and hardest)
    ids: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: "str | Choice | None", default: str = DEFAULT) -> "Choice":
        if isinstance(text, Choice):
            return text
        text = (default if text is None else str(text)).strip()
        how, _, rest = text.partition(":")
        try:
            if how == "ids":
                ids = tuple(dict.fromkeys(int(p) for p in rest.split(",") if p.strip()))  # in order, once each
                if ids and min(ids) >= 0:
                    return cls("ids", ids=ids)
            elif how in ("random", "failures", "hardest", "first") and (not rest or how != "first"):
                return cls(how, seed=int(rest) if rest else 0)
        except ValueError:
            pass
        raise UserError(f"--examples {text!r}: choose {CHOICES} (example ids are whole numbers from 0)")

    def describe(self) -> str:
        return {
            "random": f"drawn at random (seed {self.seed})",
            "failures": f"that the task's verdict rejects, among up to {POOL} drawn at random (seed {self.seed})",
            "hardest": f"with the most cells to change, among up to {POOL} drawn at random (seed {self.seed})",
            "first": "first in the split",
            "ids": "ids " + ", ".join(map(str, self.ids)),
        }[self.how]


def pick(dataset, n: int, choice: Choice, *, check=None) -> np.ndarray:
    """Indices of up to `n` examples of `dataset` (all of `ids`); `failures` needs a model's
    answers and is `run_examples`' to pick. `check` (a `Boundary.batch`) checks what `hardest` reads."""
    size = len(dataset)
    if choice.how == "ids":
        beyond = [i for i in choice.ids if i >= size]
        if beyond:
            raise UserError(f"--examples ids: no example {beyond[0]}; the split has {size} (ids 0 to {size - 1})")
        return np.array(choice.ids, dtype=np.int64)
    n = min(int(n), size)
    if choice.how == "first":
        return np.arange(n, dtype=np.int64)
    if choice.how == "random":
        return sample_indices(size, n, choice.seed)
    if choice.how == "hardest":
        pool = sample_indices(size, POOL, choice.seed)
        batch = fetch(dataset, pool, check=check)
        x, y = batch["inputs"], batch["labels"]
        todo = ((x != y) & (y != IGNORE)).sum(1).numpy()
        return pool[np.argsort(-todo, kind="stable")[:n]]
    raise UserError("--examples failures needs a trained model's answers: use it with dis eval --trajectories N")




@attrs.frozen
class Verdict:
    ok: bool
    word: str  # "valid" / "invalid" (a validity metric), "correct" / "wrong"
    by: str  # what judged: "nqueens/valid_solution_rate", "exact match with the reference"

    def __str__(self) -> str:
        return f"{self.word} ({self.by})"


def final_answers(result: Rollout) -> torch.Tensor:
    """(B, L): each example's answer after the last step it ran."""
    last = (result.steps.clamp(min=1) - 1).long()
    return result.preds[torch.arange(len(last)), last]


def verdicts(batch: dict, result: Rollout, evaluators=None, task=None) -> list[Verdict | None]:
    """The task's verdict on each example's final answer: the task's own check when it offers one
    (`AnswerCheckingTask`: any valid solution counts, not only the sampled label), else an
    evaluator's headline metric on the example alone (those with a validity headline first, then
    in recipe order; the first that scores every example 0 or 1), else exact match with the
    reference's supervised cells; None for an example without a reference. `evaluators`: the
    recipe's {name: evaluator}."""
    answers = final_answers(result)
    if isinstance(task, AnswerCheckingTask):
        try:
            ok = np.asarray(task.check_answers(batch["inputs"].numpy(), answers.numpy()), dtype=bool)
        except Exception:  # a plugin's check that fails on these rows: the other verdicts still come
            ok = None
        if ok is not None and ok.shape == (len(answers),):
            return [Verdict(bool(v), "valid" if v else "invalid", "the task's answer check") for v in ok]
    named = list(evaluators.items()) if isinstance(evaluators, Mapping) else [(type(e).__name__, e) for e in evaluators or ()]
    named.sort(key=lambda item: "valid" not in (headline_of(item[1]) or ""))
    for name, ev in named:
        judged = _by_evaluator(name, ev, batch, answers)
        if judged is not None:
            return judged
    supervised = batch["labels"] != IGNORE
    wrong = ((answers != batch["labels"]) & supervised).sum(-1)
    by = "exact match with the reference"
    return [Verdict(not w, "wrong" if w else "correct", by) if s else None for w, s in zip(wrong.tolist(), supervised.any(-1).tolist())]


def _by_evaluator(name: str, evaluator, batch: dict, answers: torch.Tensor) -> list[Verdict] | None:
    headline = headline_of(evaluator)
    if not headline:
        return None
    ev = copy.deepcopy(evaluator)  # the run's evaluator keeps its own state
    valid = "valid" in headline
    out = []
    try:
        # One example alone makes some evaluators warn about coverage (ARC scores tasks); that
        # is about the aggregate, not the verdict.
        with capture_logs():
            for i in range(len(answers)):
                ev.reset()
                one = {k: v[i: i + 1] for k, v in batch.items()}
                ev.update(EvalRecord(batch=one, preds=answers[i: i + 1, None], q_halt=torch.zeros(1),
                                     steps=torch.ones(1, dtype=torch.long)))
                value = ev.compute([ev.state()], None).get(headline)
                if value not in (0.0, 1.0):  # not a per-example pass/fail (a task with several test pairs)
                    return None
                ok = value == 1.0
                out.append(Verdict(ok, ("valid" if ok else "invalid") if valid else ("correct" if ok else "wrong"), f"{name}/{headline}"))
    except Exception:  # an evaluator that cannot score one example alone: fall back, the pictures still come
        return None
    return out
