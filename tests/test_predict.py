"""`dis predict` on many puzzles and `dis eval` beside a run still training (issue 17): answers
written batch by batch, bad inputs named by file, puzzle, row and column, per-answer `valid`
and `givens_consistent`, non-finite --w, --out onto a directory, checkpoints pruned while read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import dis_core
from dis_core.tools import cli, inference
from dis_core.contract.errors import DataError, UserError
from dis_core.tools.inference_cli import AnswerWriter
from dis_core.contract.interfaces import AnswerCheckingTask, GivensCheckingTask, PuzzleIO
from dis_core.wiring.recipe import load_recipe
from dis_core.loop.trainer import Trainer

from conftest import tiny_recipe

N = 5  # the tiny recipe's board size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 10-step tiny N-Queens run with EMA weights and two checkpoints kept (step_5, step_10)."""
    from dis_core.wiring.plugins import load_registry

    tmp = tmp_path_factory.mktemp("predict")
    registry = load_registry()
    overrides = ["train.ema=0.9", "train.checkpoint_interval=5", "train.keep_checkpoints=0"]
    resolved = load_recipe(tiny_recipe(tmp, steps=10), registry, overrides)
    Trainer(resolved, registry, tmp / "run", data_dir=tmp / "data").fit(registry)
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").glob("step_*")) == ["step_10", "step_5"]
    return tmp / "run", tmp / "data"


@pytest.fixture(scope="module")
def model(run):
    out, data = run
    return dis_core.load(out, data_dir=data)


def _boards(count: int, seed: int = 0) -> list:
    """`count` boards with 0-2 queens placed at random (attacking ones too), as row strings and,
    every third one, as 0/1 rows."""
    rng = np.random.default_rng(seed)
    boards = []
    for i in range(count):
        grid = np.zeros((N, N), dtype=int)
        grid.flat[rng.choice(N * N, size=rng.integers(0, 3), replace=False)] = 1
        boards.append(grid.tolist() if i % 3 == 2 else ["".join(".Q"[v] for v in row) for row in grid])
    return boards


def _solves(board: list, answer: list) -> bool:
    """An N-Queens check written apart from the task's: N queens, no two on a line, givens kept."""
    given = [[str(c) in "Q1" for c in row] for row in board]
    queens = [(r, c) for r, row in enumerate(answer) for c, v in enumerate(row) if str(v) in "Q1"]
    if any(str(v) not in "Q.10" for row in answer for v in row) or len(queens) != N:
        return False
    for key in (lambda q: q[0], lambda q: q[1], lambda q: q[0] - q[1], lambda q: q[0] + q[1]):
        if len({key(q) for q in queens}) != N:
            return False
    return all((r, c) in queens for r in range(N) for c in range(N) if given[r][c])


def _predict(run, tmp_path, boards, *extra) -> int:
    out, data = run
    (tmp_path / "boards.json").write_text(json.dumps(boards))
    return cli.main(["predict", str(out), str(tmp_path / "boards.json"), "--data-dir", str(data), *extra])


# ------------------------------------------------------------------ answers batch by batch


@pytest.mark.parametrize("name", ["answers.json", "answers.jsonl"])
def test_answers_are_written_batch_by_batch_and_equal_the_unbatched_ones(run, model, tmp_path, monkeypatch, name):
    boards = _boards(300)
    target = tmp_path / name
    seen = []  # after each batch: the file as a reader would find it then
    write = AnswerWriter.write

    def spy(self, rows):
        write(self, rows)
        text = target.read_text()
        if name.endswith(".jsonl"):
            lines = [json.loads(line) for line in text.splitlines()]  # every line parses
            seen.append((len(lines) - 1, None))
        else:
            doc = json.loads(text)  # the whole file parses after every batch
            seen.append((len(doc["predictions"]), doc["complete"]))

    monkeypatch.setattr(AnswerWriter, "write", spy)
    assert _predict(run, tmp_path, boards, "--out", str(target), "--batch-size", "64") == 0
    # 300 boards in batches of 64: the file grows by one batch at a time and is valid between.
    sizes = [min(64 * (k + 1), 300) for k in range(5)]
    assert seen == [(s, None if name.endswith(".jsonl") else False) for s in sizes]
    if name.endswith(".jsonl"):
        lines = target.read_text().splitlines()
        head, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    else:
        doc = json.loads(target.read_text())
        head, rows = doc, doc["predictions"]
        assert doc["complete"] is True
    assert head["count"] == 300 and head["task"] == "nqueens" and head["steps"] == 3 and head["step"] == 10
    # One batch of all 300 gives the same answers, steps and flags.
    once = json.loads(json.dumps(model.predict(boards, batch_size=300)))
    assert rows == once
    assert [r["input"] for r in rows] == boards


def test_predict_batches_runs_one_batch_per_item(model, monkeypatch):
    """Lazy: taking the first batch runs one rollout, so memory holds one batch's steps."""
    calls = []
    rollout = model.rollout
    monkeypatch.setattr(model, "rollout", lambda *a, **k: calls.append(1) or rollout(*a, **k))
    batches = model.predict_batches(_boards(20), batch_size=8)
    assert calls == []
    assert len(next(batches)) == 8 and len(calls) == 1
    assert [len(b) for b in batches] == [8, 4] and len(calls) == 3


@pytest.mark.parametrize("name", ["answers.json", "answers.jsonl"])
def test_an_interrupted_run_keeps_the_answers_written(run, tmp_path, monkeypatch, capsys, name):
    rollout = inference.Model.rollout
    calls = []

    def stop_at_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return rollout(self, *a, **k)

    monkeypatch.setattr(inference.Model, "rollout", stop_at_third)
    target = tmp_path / name
    assert _predict(run, tmp_path, _boards(40), "--out", str(target), "--batch-size", "8") == 130
    assert "interrupted: 16 of 40 answer(s) written" in capsys.readouterr().err
    if name.endswith(".jsonl"):
        lines = target.read_text().splitlines()
        assert json.loads(lines[0])["count"] == 40 and len([json.loads(x) for x in lines[1:]]) == 16
    else:
        doc = json.loads(target.read_text())
        assert doc["complete"] is False and doc["count"] == 40 and len(doc["predictions"]) == 16


def test_stdout_gets_the_same_object(run, tmp_path, capsys):
    boards = _boards(10)
    assert _predict(run, tmp_path, boards, "--batch-size", "4") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["complete"] is True and len(doc["predictions"]) == 10


# ------------------------------------------------------------------ valid and givens_consistent


def test_valid_and_givens_consistent_per_answer(run, tmp_path, capsys):
    boards = _boards(60, seed=1)
    clash = ["Q...Q", ".....", ".....", ".....", "....."]  # two given queens on row 0
    boards.append(clash)
    target = tmp_path / "a.json"
    assert _predict(run, tmp_path, boards, "--out", str(target)) == 0
    rows = json.loads(target.read_text())["predictions"]
    for board, row in zip(boards, rows):
        assert row["valid"] is _solves(board, row["answer"]), row
    flags = [row["givens_consistent"] for row in rows]
    assert flags[-1] is False and rows[-1]["valid"] is False  # no solution holds two queens on a row
    assert all(flags[i] is _solves_givens(b) for i, b in enumerate(boards))
    assert f"{flags.count(False)} puzzle(s) have givens that break the puzzle's rules" in capsys.readouterr().err


def _solves_givens(board) -> bool:
    queens = [(r, c) for r, row in enumerate(board) for c, v in enumerate(row) if str(v) in "Q1"]
    return all(len({key(q) for q in queens}) == len(queens)
               for key in (lambda q: q[0], lambda q: q[1], lambda q: q[0] - q[1], lambda q: q[0] + q[1]))


def test_a_task_without_the_checks_answers_null(model, monkeypatch):
    """A third-party task with encode_inputs/decode only: `valid` and `givens_consistent` are None."""
    real = model.task

    class Plain:
        spec = real.spec

        def encode_inputs(self, puzzles):
            return real.encode_inputs(puzzles)

        def decode(self, tokens, puzzle):
            return real.decode(tokens, puzzle)

    plain = Plain()
    assert isinstance(plain, PuzzleIO) and not isinstance(plain, (AnswerCheckingTask, GivensCheckingTask))
    monkeypatch.setattr(model.solver.components, "task", plain)
    rows = model.predict(_boards(3))
    assert [(r["valid"], r["givens_consistent"]) for r in rows] == [(None, None)] * 3
    assert all(isinstance(r["answer"], list) for r in rows)


def test_tasks_check_answers_and_givens(tmp_path):
    from dis_plugins.tasks.arc.task import ArcTask
    from dis_plugins.tasks.maze import MazeConfig, MazeTask
    from dis_plugins.tasks.nqueens import NQueensConfig, NQueensTask
    from dis_plugins.tasks.sudoku import SudokuConfig, SudokuTask

    nq = NQueensTask(NQueensConfig(board_size=5, num_train=2, num_test=2))
    solution = ["Q....", "..Q..", "....Q", ".Q...", "...Q."]
    x = nq.encode_inputs([["Q....", ".....", ".....", ".....", "....."],  # a given the solution keeps
                          [".Q...", ".....", ".....", ".....", "....."],  # a given it drops
                          ["Q....", ".....", "..Q..", ".....", "....."]])  # two givens on a diagonal
    y = nq.encode_inputs([solution] * 3)["inputs"]
    assert nq.check_answers(x["inputs"], y).tolist() == [True, False, False]
    four = nq.encode_inputs([["Q....", "..Q..", "....Q", ".Q...", "....."]])["inputs"]
    assert nq.check_answers(x["inputs"][:1], four).tolist() == [False]
    assert nq.check_givens(x["inputs"]).tolist() == [True, True, False]

    su = SudokuTask(SudokuConfig(size=4, num_train=3, num_test=3, num_augmentations=0, cache=False), tmp_path)
    batch = su.dataset("test").get(np.arange(3))
    q, s = batch["inputs"], batch["labels"]
    assert su.check_answers(q, s).tolist() == [True] * 3
    swapped = s.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]  # two cells of a row swapped: a column repeats a digit
    assert not su.check_answers(q, swapped).any()
    other = su.encode_inputs(["1234341221434321"])["inputs"]  # a valid grid, but not these givens
    keeps = bool(((other[0] == q[0]) | (q[0] == 1)).all())
    assert su.check_answers(q[:1], other).tolist() == [keeps]
    assert su.check_givens(q).all()
    assert su.check_givens(su.encode_inputs(["1..1" + "." * 12, "1...1" + "." * 11, "1....1" + "." * 10,
                                             "12" + "." * 14])["inputs"]).tolist() == [False, False, False, True]

    mz = MazeTask(MazeConfig(rows=7, cols=7, num_train=2, num_test=2, min_path_length=4, cache=False), tmp_path)
    batch = mz.dataset("test").get(np.arange(2))
    assert mz.check_answers(batch["inputs"], batch["labels"]).tolist() == [True, True]
    assert mz.check_answers(batch["inputs"], batch["inputs"]).tolist() == [False, False]  # no path marked
    assert isinstance(mz, AnswerCheckingTask) and not isinstance(mz, GivensCheckingTask)
    # ARC cannot tell a right answer without the true output: no check, `valid` stays null.
    assert not isinstance(ArcTask.__new__(ArcTask), AnswerCheckingTask)


# ------------------------------------------------------------------ malformed inputs and flags


@pytest.mark.parametrize("board, words", [
    (["..X..", "..Z..", ".....", ".....", "....."], "row 1 column 2: 'Z' is neither a queen"),
    ([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 2, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], "row 2 column 3: 2 is neither"),
    ([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0.5, 0, 0, 0]], "row 4 column 1: 0.5 is neither"),
    (["....", ".....", ".....", ".....", "....."], "row 0 has 4 cells"),
    ([".....", 7, ".....", ".....", "....."], "row 1 is 7"),
])
def test_a_bad_cell_is_named_by_file_puzzle_row_and_column(run, tmp_path, capsys, board, words):
    """The bad board is number 250 of 300, in the 32nd batch of 8: every puzzle is checked
    before any answer is written, and the message counts puzzles over the whole file."""
    boards = _boards(300)
    boards[250] = board
    target = tmp_path / "a.json"
    assert _predict(run, tmp_path, boards, "--out", str(target), "--batch-size", "8") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'boards.json'}: puzzle 250: {words}" in err, err
    assert "Traceback" not in err and not target.exists()
    if "neither" in words:
        assert "'Q', 'q', '1', 'X', 'x' or 1" in err and "'.', '0', '_', '-', ' ' or 0" in err


def test_other_tasks_name_the_bad_cell(tmp_path):
    from dis_plugins.tasks.arc.task import ArcConfig, ArcTask
    from dis_plugins.tasks.maze import MazeConfig, MazeTask
    from dis_plugins.tasks.sudoku import SudokuConfig, SudokuTask

    su = SudokuTask(SudokuConfig(size=4, num_train=2, num_test=2, num_augmentations=0, cache=False), tmp_path)
    with pytest.raises(DataError, match=r"puzzle 1: row 1 column 2: '5' is not a cell; each is '\.' or '0' \(blank\) or a digit 1\.\.4"):
        su.encode_inputs(["." * 16, "......5........."])
    with pytest.raises(DataError, match=r"puzzle 0: row 3 column 0: True is not a cell; each is an int 0 \(blank\) to 4"):
        su.encode_inputs([[[0] * 4, [0] * 4, [0] * 4, [True, 0, 0, 0]]])
    with pytest.raises(DataError, match="has 16 characters, not 15"):
        su.encode_inputs(["." * 15])

    mz = MazeTask(MazeConfig(rows=3, cols=4, num_train=2, num_test=2, min_path_length=1, cache=False), tmp_path)
    with pytest.raises(DataError, match=r"puzzle 0: row 2 column 1: 'X' is not a maze cell; each is '#' wall, ' ' open, 'S' start or 'G' goal"):
        mz.encode_inputs([["S  G", "    ", "#X##"]])
    with pytest.raises(DataError, match="puzzle 0: row 1 has 3 characters"):
        mz.encode_inputs([["S  G", "   ", "####"]])
    assert mz.encode_inputs([["S  G", "    ", "####"], "S  G    ####"])["inputs"].shape == (2, 12)

    folder = tmp_path / "te"
    folder.mkdir()
    (folder / "t1.json").write_text(json.dumps({"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[5]], "output": [[6]]}]}))
    arc = ArcTask(ArcConfig(train_subsets=(), test_subset=str(folder), num_augmentations=1))
    for grid, bad in (([[1, 2], [3, 10]], "row 1 column 1: colour 10"), ([[1, 2.5]], "row 0 column 1: colour 2.5"),
                      ([[1, "3"]], "row 0 column 1: colour '3'"), ([[0, -1]], "row 0 column 1: colour -1")):
        with pytest.raises(DataError, match=f"puzzle 1: {bad} is not an integer 0..9"):
            arc.encode_inputs([[[1]], {"input": grid}])


@pytest.mark.parametrize("w", ["nan", "inf", "-inf"])
def test_a_non_finite_w_exits_2(run, tmp_path, capsys, w):
    assert _predict(run, tmp_path, _boards(2), f"--w={w}") == 2  # "=": argparse reads a bare -inf as an option
    err = capsys.readouterr().err
    assert f"--w {w}: the guidance scale must be a finite number" in err and "Traceback" not in err


def test_a_non_finite_w_is_refused_by_the_library_too(model):
    with pytest.raises(UserError, match="finite number"):
        model.predict(_boards(2), guidance=float("nan"))


def test_out_onto_a_directory_or_under_a_file_exits_2(run, tmp_path, capsys):
    (tmp_path / "answers").mkdir()
    assert _predict(run, tmp_path, _boards(2), "--out", str(tmp_path / "answers")) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'answers'} is a directory; name the answers file" in err
    assert ".tmp" not in err and "Traceback" not in err
    (tmp_path / "plain").write_text("")
    assert _predict(run, tmp_path, _boards(2), "--out", str(tmp_path / "plain" / "a.json")) == 2
    assert f"{tmp_path / 'plain'} is a file, not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------ checkpoints pruned while read


def _pruned_after_locate(monkeypatch, root, *, only_ema: bool = False):
    """`locate` answers step_5 (the newest then); right after, the "training run" renames its new
    step_10 into place, points `latest` at it and prunes step_5, as checkpoint.save and prune do.
    With `only_ema`, the prune is caught half-way: only step_5's ema_weights.pt is gone."""
    (root / "step_10").rename(root / ".tmp-step_10")
    (root / "latest").write_text("step_5\n")
    real, calls = inference.locate, []

    def locate(source):
        found = real(source)
        calls.append(found[1].name)
        if len(calls) == 1:
            (root / ".tmp-step_10").rename(root / "step_10")
            (root / "latest").write_text("step_10\n")
            if only_ema:
                (root / "step_5" / "ema_weights.pt").unlink()
            else:
                shutil.rmtree(root / "step_5")
        return found

    monkeypatch.setattr(inference, "locate", locate)
    return calls


@pytest.mark.parametrize("only_ema", [False, True])
def test_eval_reads_the_newer_checkpoint_when_the_one_chosen_is_pruned(run, tmp_path, monkeypatch, only_ema):
    out, data = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    calls = _pruned_after_locate(monkeypatch, copy / "checkpoints", only_ema=only_ema)
    assert cli.main(["eval", str(copy), "--out", str(tmp_path / "ev"), "--data-dir", str(data)]) == 0
    assert calls == ["step_5", "step_10"]
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["checkpoint"].endswith("step_10") and saved["step"] == 10 and saved["weights"] == "ema"


def test_a_named_checkpoint_pruned_while_read_exits_2(run, tmp_path, monkeypatch, capsys):
    out, data = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    real = inference.locate

    def locate(source):
        found = real(source)
        shutil.rmtree(found[1])
        return found

    monkeypatch.setattr(inference, "locate", locate)
    assert cli.main(["eval", str(copy / "checkpoints" / "step_5"), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "step_5" in err and "removed while being read" in err and "pass the run directory" in err
    assert "Traceback" not in err


def test_the_newest_checkpoint_missing_a_file_for_good_exits_2(run, tmp_path, capsys):
    """Not a prune in progress (no newer checkpoint appears): the EMA run's newest checkpoint
    lacks ema_weights.pt. Reading the trained weights instead would evaluate other weights."""
    out, data = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "checkpoints" / "step_10" / "ema_weights.pt").unlink()
    assert cli.main(["eval", str(copy), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"ema_weights.pt: missing from {copy / 'checkpoints' / 'step_10'}" in err and "Traceback" not in err
