"""What users see (issue #17, part 4): trajectory pictures (the model's answer apart from the
reference, per-step targets, the task's verdict, collapsed steps, a legend, the choice of
examples) and `dis show` / `dis check` (the same choice, the task's own cells, `--batch 0`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from dis_core.tools import cli
from dis_core.outputs import trajectories
from dis_core.step.diagnostics import sample_indices
from dis_core.contract.errors import UserError
from dis_core.tools.kit import check_recipe, show_examples
from dis_core.wiring.recipe import load_recipe
from dis_core.step.solver import Solver
from dis_core.step.supervision import Rollout
from dis_core.outputs.selection import Choice, Verdict, pick, verdicts
from dis_core.outputs.trajectories import columns
from dis_plugins.evaluators import ExactEvaluator
from dis_plugins.tasks.nqueens import EMPTY, QUEEN, NQueensConfig, NQueensEvaluator, NQueensTask

from conftest import tiny_recipe

N = 5  # board side of the tiny N-Queens task


@pytest.fixture(scope="module")
def task():
    return NQueensTask(NQueensConfig(board_size=N, num_train=40, num_test=12))


def board(*cols: int) -> np.ndarray:
    """(N*N,) tokens: a queen in column cols[r] of row r (-1: none)."""
    out = np.full(N * N, EMPTY, dtype=np.int64)
    for r, c in enumerate(cols):
        if c >= 0:
            out[r * N + c] = QUEEN
    return out


SOLUTION = board(0, 2, 4, 1, 3)  # one of the 10 solutions
MIRROR = board(4, 2, 0, 3, 1)  # another: SOLUTION flipped left to right
BLANK = board()


def one(inputs, labels, answer, steps: int = 1):
    batch = {"inputs": torch.as_tensor(np.stack(inputs)), "labels": torch.as_tensor(np.stack(labels)),
             "puzzle_ids": torch.zeros(len(inputs), dtype=torch.long), "example_ids": torch.arange(len(inputs))}
    preds = torch.as_tensor(np.stack(answer))[:, None].expand(-1, steps, -1)
    return batch, Rollout(preds=preds, q_halt=torch.zeros(len(inputs)), steps=torch.full((len(inputs),), steps))


# ------------------------------------------------------------------ the verdict


def test_the_verdict_is_the_tasks_validity_not_a_match_with_one_sampled_solution():
    batch, result = one([BLANK, BLANK, BLANK], [SOLUTION] * 3, [MIRROR, board(0, 1, 4, 1, 3), SOLUTION])
    evaluators = {"exact": ExactEvaluator(), "nqueens": NQueensEvaluator(N)}  # the validity one wins, listed second
    judged = verdicts(batch, result, evaluators)
    assert [(v.ok, v.word) for v in judged] == [(True, "valid"), (False, "invalid"), (True, "valid")]
    assert {v.by for v in judged} == {"nqueens/valid_solution_rate"}
    # Without an evaluator: exact match with the reference, which calls the other solution wrong.
    assert [(v.ok, v.word, v.by) for v in verdicts(batch, result)] == [
        (False, "wrong", "exact match with the reference"), (False, "wrong", "exact match with the reference"),
        (True, "correct", "exact match with the reference")]
    # The run's evaluator is left as it was (verdicts score copies).
    assert evaluators["nqueens"].compute([evaluators["nqueens"].state()], None) == {"count": 0.0}


def test_an_evaluator_that_cannot_judge_one_example_falls_back_to_the_reference():
    class Broken:
        headline = "valid_rate"

        def reset(self):
            pass

        def update(self, record):
            raise KeyError("arc_task")  # needs keys this batch lacks

    batch, result = one([BLANK], [SOLUTION], [MIRROR])
    (v,) = verdicts(batch, result, {"broken": Broken()})
    assert (v.ok, v.by) == (False, "exact match with the reference")
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    assert verdicts(unlabelled, result) == [None]  # nothing to judge by


# ------------------------------------------------------------------ the panels


def test_the_answer_panel_holds_the_prediction_and_the_reference_the_label(task):
    x = board(0)
    a, b, c = board(0, 2), board(0, 2, 4), board(0, 2, 4, 1, 1)  # c: the last queen attacks
    preds = np.stack([a, b, b, b, c])  # (N steps, L); steps 2-4 leave the answer as it is
    targets = np.stack([a, b, board(0, 2, 4, 1), SOLUTION, SOLUTION])
    verdict = Verdict(False, "invalid", "nqueens/valid_solution_rate")
    cols = columns(x, SOLUTION, preds, 5, verdict=verdict, targets=targets)
    tops = [top.title for top, _ in cols]
    assert tops == ["question", "step 1: 1 changed", "steps 2-4: 1 changed", "step 5: 2 changed",
                    "model's answer: invalid", "reference: 2 cells differ"]
    answer, reference = cols[-2][0], cols[-1][0]
    assert (answer.tokens == c).all() and (reference.tokens == SOLUTION).all()
    assert answer.colour == trajectories.BAD
    assert reference.dashed and np.flatnonzero(reference.outline).tolist() == [4 * N + 1, 4 * N + 3]
    # The collapsed panel shows the target of its last step, dashed where the step's answer differs.
    bottom = cols[2][1]
    assert bottom.title == "target, step 4" and (bottom.tokens == SOLUTION).all()
    assert np.flatnonzero(bottom.outline).tolist() == [3 * N + 1, 4 * N + 3]
    assert cols[0][1] is None and cols[-1][1] is None
    # Steps past the last one run are not drawn; without targets there is no second row.
    cols = columns(x, SOLUTION, preds, 2)
    assert [top.title for top, _ in cols][1:3] == ["step 1: 1 changed", "step 2: 1 changed"]
    assert all(bottom is None for _, bottom in cols)


def test_the_figure_draws_the_models_answer_under_its_title_with_a_legend(task):
    import matplotlib.pyplot as plt

    x, answer = board(0), board(0, 1, 4, 1, 3)
    preds = np.stack([board(0, 2), answer, answer])
    cols = columns(x, SOLUTION, preds, 3, verdict=Verdict(False, "invalid", "nqueens"), targets=np.stack([board(0, 2), SOLUTION, SOLUTION]))
    fig = trajectories.figure(task, cols, x, "example 0")
    try:
        titled = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
        assert set(titled) == {"question", "step 1: 1 changed", "steps 2-3: 5 changed", "model's answer: invalid",
                               "reference: 2 cells differ", "target, step 1", "target, step 3"}
        # The task draws queens as text on the board's colours: read back where the panel put them.
        ax = titled["model's answer: invalid"]
        queens = sorted(int(t.get_position()[1]) * N + int(t.get_position()[0]) for t in ax.texts if t.get_text() == "\u265b")
        assert queens == np.flatnonzero(answer == QUEEN).tolist() != np.flatnonzero(SOLUTION == QUEEN).tolist()
        assert (np.asarray(ax.get_images()[0].get_array()) == trajectories.render(task, answer, x)["rgb"]).all()
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend[0] == "a cell this step changed" and legend[1].startswith("the model's answer differs here")
        notes = " ".join(t.get_text() for t in fig.texts)
        assert "cell colours: A chess board" in notes and "attacking another one red" in notes
    finally:
        plt.close(fig)


# ------------------------------------------------------------------ choosing examples


def test_choices_parse_and_bad_ones_say_what_there_is():
    assert Choice.parse(None) == Choice("random", seed=0)
    assert Choice.parse("random:7") == Choice("random", seed=7)
    assert Choice.parse(" ids:3, 17,3,42") == Choice("ids", ids=(3, 17, 42))
    assert Choice.parse(None, default="hardest").how == "hardest"
    for bad in ("worst", "ids:", "ids:a", "ids:-1", "first:3", "random:x", ""):
        with pytest.raises(UserError, match="choose failures, random, random:SEED, hardest, first or ids:3,17,42"):
            Choice.parse(bad)


def test_pick_random_hardest_first_and_ids(task):
    test = task.dataset("test")  # cells to change: 3 4 5 5 1 3 1 4 4 2 5 1
    random = pick(test, 4, Choice.parse("random"))
    assert random.tolist() == sample_indices(12, 4, 0).tolist() == pick(test, 4, Choice.parse("random")).tolist()
    assert random.tolist() != list(range(4))
    assert pick(test, 3, Choice.parse("hardest")).tolist() == [2, 3, 10]
    assert pick(test, 30, Choice.parse("first")).tolist() == list(range(12))
    assert pick(test, 1, Choice.parse("ids:9,0")).tolist() == [9, 0]  # all the ids, in their order
    with pytest.raises(UserError, match="no example 12; the split has 12"):
        pick(test, 1, Choice.parse("ids:3,12"))
    with pytest.raises(UserError, match="failures needs a trained model"):
        pick(test, 1, Choice.parse("failures"))


def fake_solver(task, solved, *, evaluators=None, targets=None, n_sup: int = 2):
    """A solver whose rollout answers the examples `solved(id)` with their label, the others with the question."""

    def rollout(batch, **options):
        good = torch.tensor([bool(solved(int(i))) for i in batch["example_ids"]])[:, None]
        answer = torch.where(good, batch["labels"], batch["inputs"])
        return Rollout(preds=answer[:, None].expand(-1, 2, -1), q_halt=torch.zeros(len(answer)), steps=torch.full((len(answer),), 2))

    return SimpleNamespace(task=task, evaluators=evaluators or {}, targets=targets, rule=SimpleNamespace(n_sup=n_sup), device="cpu",
                           recipe=SimpleNamespace(train=SimpleNamespace(seed=0)), rollout=rollout)


def test_failures_picks_only_examples_the_task_rejects(task, monkeypatch, tmp_path):
    monkeypatch.setattr(trajectories, "CHUNK", 4)  # several batches of the search, concatenated
    evaluators = {"nqueens": NQueensEvaluator(N)}
    solver = fake_solver(task, lambda i: i % 2 == 0, evaluators=evaluators)
    batch, result = trajectories.run_examples(solver, task.dataset("test"), 3, examples="failures")
    assert batch["example_ids"].tolist() == [1, 3, 5]  # the odd ones fail (a question lacks queens)
    assert (result.preds[:, -1] == batch["inputs"]).all()  # their rows as the search ran them
    assert all(not v.ok for v in verdicts(batch, result, evaluators))
    paths = trajectories.draw(task, batch, result, tmp_path / "f", evaluators=evaluators, examples="failures")
    assert [p.name for p in paths] == ["example_000001.png", "example_000003.png", "example_000005.png"]
    page = (tmp_path / "f" / "index.html").read_text()
    assert "that the task&#x27;s verdict rejects" in page and page.count("invalid (the task&#x27;s answer check)</figcaption>") == 3

    solver = fake_solver(task, lambda i: True, evaluators=evaluators)
    batch, result = trajectories.run_examples(solver, task.dataset("test"), 3, examples="failures")
    assert len(batch["inputs"]) == 0
    assert trajectories.draw(task, batch, result, tmp_path / "none", examples="failures") == []
    assert "None was found." in (tmp_path / "none" / "index.html").read_text()


def test_training_time_pictures_show_the_same_random_examples_with_targets(task, tmp_path):
    sent = []
    solver = fake_solver(task, lambda i: i == 9, evaluators={"nqueens": NQueensEvaluator(N)},
                         targets=lambda batch, n_sup, gen: task.solver_trajectory(batch, n_sup))
    run = SimpleNamespace(path=tmp_path / "run", loggers=SimpleNamespace(images=lambda s, p: sent.append((s, p))))
    paths = trajectories.at_evaluation(solver, task.dataset("test"), 2, run, 6)
    assert [p.name for p in paths] == ["example_000007.png", "example_000009.png"]  # sample_indices(12, 2, 0)
    assert sent == [(6, paths)] and all(p.is_file() for p in paths)
    page = (tmp_path / "run" / "eval" / "step_6" / "trajectories" / "index.html").read_text()
    assert "drawn at random (seed 0)" in page and "example 9 · 2 step(s) · valid (" in page and "example 7 · 2 step(s) · invalid (" in page


def test_target_frames_only_when_the_run_has_per_step_targets(task):
    batch = {k: torch.as_tensor(v) for k, v in task.dataset("test").get(np.arange(3)).items()}
    frames = trajectories.target_frames(lambda b, n, g: task.solver_trajectory(b, n), batch, 3, 0)
    assert frames.shape == (3, 3, N * N) and (frames[:, -1] == batch["labels"]).all()
    final = trajectories.target_frames(lambda b, n, g: b["labels"][:, None].expand(-1, n, -1), batch, 3, 0)
    assert final is None  # TRM's `final`: every step's target is y*, shown once as the reference

    def fails(b, n, g):
        raise KeyError("no plan for example 0")

    with capture_logs() as logs:
        assert trajectories.target_frames(fails, batch, 3, 0) is None
    assert "KeyError" in logs[0]["error"]


def test_pictures_of_a_loaded_model_use_its_evaluators_targets_and_choice(tmp_path, registry):
    resolved = load_recipe(tiny_recipe(tmp_path), registry)
    model = SimpleNamespace(solver=Solver.build(resolved, registry, tmp_path / "data"), task=None, run_dir=tmp_path / "run",
                            checkpoint=Path("step_6"), weights="trained")
    model.task = model.solver.task
    paths = trajectories.for_model(model, 1, tmp_path / "pics", examples="ids:4,7")
    assert [p.name for p in paths] == ["example_000004.png", "example_000007.png"]
    page = (tmp_path / "pics" / "index.html").read_text()
    assert "Examples ids 4, 7." in page and page.count("(the task&#x27;s answer check)</figcaption>") == 2
    assert "run · step_6 · trained weights" in page


# ------------------------------------------------------------------ dis show, dis check


def test_dis_check_rejects_a_batch_that_is_not_positive(tmp_path, registry, capsys):
    recipe = tiny_recipe(tmp_path)
    for bad in ("0", "-3"):
        assert cli.main(["check", str(recipe), "--batch", bad, "--data-dir", str(tmp_path / "data")]) == 2
        assert f"error: --batch {bad}: must be a positive number of examples" in capsys.readouterr().err
    assert cli.main(["check", str(recipe), "--examples", "failures", "--data-dir", str(tmp_path / "data")]) == 2
    assert "dis check runs no trained model" in capsys.readouterr().err
    assert cli.main(["show", str(recipe), "--examples", "ids:5,999", "--data-dir", str(tmp_path / "data")]) == 2
    assert "no example 999; the split has 360" in capsys.readouterr().err


def test_dis_check_reports_the_target_path_of_examples_with_cells_to_change(tmp_path, registry):
    rows = check_recipe(load_recipe(tiny_recipe(tmp_path), registry), registry, data_dir=tmp_path / "data")
    (targets,) = [r for r in rows if r.kind == "target_generator"]
    assert targets.ok, targets.problem
    # The first training examples are one puzzle's 9 copies with 3 queens to place; the chosen
    # ones have all 5 to place, so the path (3 steps) falls from 4 to 0, not from 2.
    path = targets.note.split("distance to y* by step: ")[1].split(" (")[0]
    assert path == "4 2 0", targets.note
    assert targets.note.endswith("; --examples hardest)")


def test_dis_show_chooses_examples_and_draws_the_tasks_cells(tmp_path, registry):
    resolved = load_recipe(tiny_recipe(tmp_path), registry)
    text = show_examples(resolved, registry, data_dir=tmp_path / "data", examples="ids:5,2")
    assert "2 train examples ids 5, 2; the target path of target generator 'reveal_path'" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("example_id")] == ["5", "2"]
    assert "\u265b" in text and "cells as the task draws them" in text  # queens, not token ids
    assert "2 2 2" not in text  # no rows of raw token ids
    counted = show_examples(resolved, registry, data_dir=tmp_path / "data", examples="4")  # a number: how many
    assert counted.count("example_id ") == 4 and "with the most cells to change" in counted
    assert "5 cells of x differ from y*" in counted.split("example_id ")[1]
    with pytest.raises(UserError, match="dis show runs no trained model"):
        show_examples(resolved, registry, data_dir=tmp_path / "data", examples="failures")


def test_dis_eval_draws_the_examples_asked_for(tmp_path, capsys):
    recipe, run, data = tiny_recipe(tmp_path, steps=2), tmp_path / "run", tmp_path / "data"
    assert cli.main(["run", str(recipe), "--out", str(run), "--data-dir", str(data)]) == 0
    assert cli.main(["eval", str(run), "--out", str(tmp_path / "ev"), "--trajectories", "2", "--examples", "ids:4,7",
                     "--data-dir", str(data)]) == 0
    folder = tmp_path / "ev" / "trajectories"
    assert sorted(p.name for p in folder.glob("*.png")) == ["example_000004.png", "example_000007.png"]
    assert "(the task&#x27;s answer check)</figcaption>" in (folder / "index.html").read_text()
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--trajectories", "2", "--examples", "worst", "--data-dir", str(data)]) == 2
    assert "--examples 'worst': choose failures, random" in capsys.readouterr().err
