"""Sudoku task: generator, augmentation, CSV import, evaluator, solver trajectory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dis_core.contract.errors import DataError, UserError
from dis_core.contract.interfaces import BuildContext, EvalRecord
from dis_plugins.tasks.sudoku import SudokuConfig, augmentation, build_sudoku, build_sudoku_evaluator
from dis_plugins.tasks.sudoku_puzzles import Geometry, make_puzzle, solve, valid_grids

# A known 9x9 puzzle (unique solution) and its solution.
Q9 = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
A9 = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def _task(tmp_path, **kw):
    cfg = SudokuConfig(**{"num_train": 30, "num_test": 10, "num_augmentations": 0, **kw})
    return build_sudoku(cfg, BuildContext(seed=0, n_sup=6, data_dir=tmp_path))


def _tensors(batch):
    return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


@pytest.mark.parametrize("size, boxes", [(4, (2, 2)), (6, (2, 3))])
def test_generated_puzzles_are_unique_and_labels_solve_them(tmp_path, size, boxes):
    task = _task(tmp_path, size=size)
    assert (task.geo.box_rows, task.geo.box_cols) == boxes
    assert task.spec.vocab_size == size + 2 and task.spec.seq_len == size * size
    assert task.spec.grid_shape == (size, size)
    b = task.dataset("train").get(np.arange(30))
    assert (b["example_ids"] == np.arange(30)).all() and (b["puzzle_ids"] == 0).all()
    for q, y in zip(b["inputs"] - 1, b["labels"] - 1):
        solutions, _, _ = solve(task.geo, q.tolist(), limit=2)
        assert solutions == [y.tolist()]  # exactly one solution, and it is the label
    assert valid_grids(b["labels"] - 1, task.geo).all()
    test_q = {bytes(r) for r in task.bank("test")["question"]}
    assert not test_q & {bytes(r) for r in task.bank("train")["question"]}  # splits disjoint


def test_nine_by_nine_minimal_puzzle_and_difficulty():
    geo = Geometry(3, 3)
    import random

    q, s, difficulty, order = make_puzzle(geo, random.Random(3))
    assert solve(geo, q, limit=2)[0] == [s]
    assert sorted(order) == [c for c in range(81) if q[c] == 0]  # every blank fixed once
    # minimal: removing any clue breaks uniqueness
    for c in (i for i in range(81) if q[i]):
        fewer = list(q)
        fewer[c] = 0
        assert len(solve(geo, fewer, limit=2)[0]) == 2, c
    # the difficulty is the dead ends the solver meets on the question
    assert difficulty == solve(geo, q, limit=2)[1]


def test_min_difficulty_and_cache(tmp_path):
    task = _task(tmp_path, size=6, num_train=5, min_difficulty=1)
    bank = task.bank("train")
    assert (bank["difficulty"] >= 1).all()
    assert list((tmp_path / "sudoku").glob("train-6x6-*.npz"))
    again = _task(tmp_path, size=6, num_train=5, min_difficulty=1).bank("train")
    assert (again["question"] == bank["question"]).all()
    with pytest.raises(UserError, match="only 0 of"):
        _task(tmp_path, size=4, num_train=3, min_difficulty=1, cache=False).bank("train")  # 4x4 never needs a guess


def test_box_config_errors(tmp_path):
    assert _task(tmp_path, box_rows=2, box_cols=3).geo.n == 6
    with pytest.raises(UserError, match="box_rows"):
        _task(tmp_path, size=9, box_rows=2, box_cols=3)
    with pytest.raises(UserError, match="boxes"):
        _task(tmp_path, size=5)


@pytest.mark.parametrize("size", [4, 6])
def test_augmentation_keeps_puzzle_and_solution_consistent(tmp_path, size):
    task = _task(tmp_path, size=size, num_train=4, num_augmentations=7)
    ds = task.dataset("train")
    assert len(ds) == 32
    b = ds.get(np.arange(32))
    again = ds.get(np.arange(32)[::-1])
    assert (again["inputs"][::-1] == b["inputs"]).all()  # a pure function of the index
    assert valid_grids(b["labels"] - 1, task.geo).all()
    assert ((b["inputs"] == 1) | (b["inputs"] == b["labels"])).all()  # givens moved with the solution
    for q, y in zip(b["inputs"] - 1, b["labels"] - 1):
        assert solve(task.geo, q.tolist(), limit=2)[0] == [y.tolist()]
    variants = {bytes(r.astype(np.uint8)) for r in b["inputs"][:8]}
    assert len(variants) > 1  # variants of one puzzle differ
    assert len(task.dataset("test")) == 10  # test is never augmented


def _transposed(src: np.ndarray, n: int) -> np.ndarray:
    """Per variant: whether its cell map transposes the board. Row and column shuffles keep
    each row's cells in one source row; a transpose sends them down one source column."""
    rows = src.reshape(-1, n, n) // n  # (K, n, n) the source row of every cell
    return ~(rows == rows[:, :, :1]).all(axis=(1, 2))


@pytest.mark.parametrize("size, square", [(4, True), (6, False)])
def test_transpose_only_with_square_boxes(tmp_path, size, square):
    """Transposing a board of 2x3 boxes would make them 3x2: only square boxes are transposed,
    and about half the variants of those are."""
    task = _task(tmp_path, size=size, num_train=1, num_augmentations=64)
    ds = task.dataset("train")
    b = ds.get(np.arange(65))  # the puzzle, then its 64 variants
    src, digits = augmentation(task.geo, ds.seed, np.arange(1, 65))
    # the maps are the ones the split applies: each variant's solution is the moved, relabelled original
    assert (np.take_along_axis(digits, np.take_along_axis(np.repeat(b["labels"][:1] - 1, 64, 0), src, axis=1), axis=1)
            == b["labels"][1:] - 1).all()
    flipped = _transposed(src, size)
    assert 16 < flipped.sum() < 48 if square else not flipped.any()
    assert valid_grids(b["labels"] - 1, task.geo).all()


def _write_csv(path, rows):
    path.write_text("source,question,answer,rating\n" + "".join(f"{r}\n" for r in rows))
    return str(path)


def test_csv_import(tmp_path):
    zero_blank = Q9.replace(".", "0")
    path = _write_csv(tmp_path / "train.csv", [f"a,{Q9},{A9},5", f"b,{zero_blank},{A9},0"])
    task = _task(tmp_path, csv_train=path, csv_test=path)
    b = task.dataset("train").get(np.arange(2))
    assert (b["inputs"][0] == b["inputs"][1]).all()
    assert b["inputs"][0, 2] == 1 and b["inputs"][0, 0] == 6  # '.' -> blank 1, digit 5 -> 6
    assert (b["labels"][0] - 1 == np.array([int(ch) for ch in A9])).all()
    assert len(_task(tmp_path, csv_train=path, min_difficulty=1).dataset("train")) == 1  # rating filter
    frames = task.solver_trajectory(_tensors(b), 4)  # solve order computed on first use
    assert (frames[:, -1] == torch.from_numpy(b["labels"])).all()


@pytest.mark.parametrize(
    "row, message",
    [
        (f"a,{Q9[:-1]},{A9},1", "81 ASCII characters"),
        (f"a,{Q9[:-1]}x,{A9},1", "character other than"),
        (f"a,{Q9},{A9[:-1]}0,1", "digits 1..9"),
        (f"a,{Q9},{'1' + A9[1:]},1", "disagrees with a given"),
        (f"a,{Q9},{A9[:2] + A9[3] + A9[2] + A9[4:]},1", "constraint"),
        (f"a,{Q9},{A9},x", "rating"),
        (f"a,{Q9},{A9}", "fields"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, row, message):
    path = _write_csv(tmp_path / "bad.csv", [f"ok,{Q9},{A9},1", row])
    with pytest.raises(DataError, match=rf"bad\.csv:3: .*{message}"):
        _task(tmp_path, csv_train=path).dataset("train")


def test_csv_missing_file_and_header(tmp_path):
    with pytest.raises(DataError, match="nope.csv not found"):
        _task(tmp_path, csv_test=str(tmp_path / "nope.csv")).dataset("test")
    bad = tmp_path / "h.csv"
    bad.write_text("q,a\n")
    with pytest.raises(DataError, match="h.csv:1: header"):
        _task(tmp_path, csv_train=str(bad)).dataset("train")


def test_evaluator_on_hand_made_predictions(tmp_path):
    path = _write_csv(tmp_path / "t.csv", [f"a,{Q9},{A9},1"])
    task = _task(tmp_path, csv_test=path)
    ctx = BuildContext(seed=0, n_sup=2, data_dir=tmp_path, task=task, spec=task.spec)
    ev = build_sudoku_evaluator(None, ctx)
    batch = _tensors(task.dataset("test").get(np.arange(1)))
    y = batch["labels"]
    broken = y.clone()
    broken[0, [2, 3]] = broken[0, [3, 2]]  # two blanks swapped: breaks the rows' columns
    relabel = y.clone()  # a valid grid that ignores the givens
    relabel[0] = torch.where(y[0] == 2, 3, torch.where(y[0] == 3, 2, y[0]))
    preds = torch.cat([y, broken, relabel])  # (3, L)
    batch3 = {k: v.repeat(3, *([1] * (v.dim() - 1))) for k, v in batch.items()}
    preds = preds[:, None, :].repeat(1, 2, 1)  # (3, N=2, L)
    ev.update(EvalRecord(batch=batch3, preds=preds, q_halt=torch.zeros(3), steps=torch.full((3,), 2)))
    m = ev.compute([ev.state()], None)
    assert m["count"] == 3
    assert m["valid_solution_rate"] == pytest.approx(1 / 3)
    assert m["exact_accuracy"] == pytest.approx(1 / 3)
    assert m["valid@1"] == m["valid@2"] == pytest.approx(1 / 3)
    # per step: the broken grid is fixed at step 2; the third example halted after step 1
    steps2 = preds.clone()
    steps2[1, 1] = y[0]
    ev.reset()
    ev.update(EvalRecord(batch=batch3, preds=steps2, q_halt=torch.zeros(3), steps=torch.tensor([2, 2, 1])))
    m = ev.compute([ev.state()], None)
    assert m["valid@1"] == pytest.approx(1 / 3) and m["valid@2"] == pytest.approx(2 / 2)
    assert m["valid_solution_rate"] == pytest.approx(2 / 3)
    ev.reset()
    assert ev.state()["count"] == 0


def test_solver_trajectory_is_nested_and_ends_at_labels(tmp_path):
    task = _task(tmp_path, size=6, num_train=8, num_augmentations=3)
    batch = _tensors(task.dataset("train").get(np.arange(32)))
    frames = task.solver_trajectory(batch, 5)  # (B, 5, L)
    assert frames.shape == (32, 5, 36)
    x, y = batch["inputs"], batch["labels"]
    assert (frames[:, -1] == y).all()
    shown = frames != x[:, None, :]  # revealed cells per frame
    assert (shown[:, 1:] >= shown[:, :-1]).all()  # nested
    assert ((frames == x[:, None, :]) | (frames == y[:, None, :])).all()
    missing = (x != y).sum(1)
    assert (shown[:, 0].sum(1) == missing // 5).all()
    # the first revealed cells are the first the solver fixes
    rank = batch["solve_rank"]
    first = torch.where(shown[:, 2], rank, torch.full_like(rank, -1)).max(1).values
    later = torch.where((x != y) & ~shown[:, 2], rank, torch.full_like(rank, 10**6)).min(1).values
    assert (first < later).all()


def test_test_split_has_no_solve_order_but_trajectories_still_work(tmp_path):
    task = _task(tmp_path, size=6, num_train=2, num_test=5)
    batch = _tensors(task.dataset("test").get(np.arange(5)))
    assert "solve_rank" not in batch
    frames = task.solver_trajectory(batch, 3)  # solved on the spot
    x, y = batch["inputs"], batch["labels"]
    assert (frames[:, -1] == y).all()
    shown = frames != x[:, None, :]
    assert (shown[:, 1:] >= shown[:, :-1]).all() and (shown[:, 0].sum(1) == (x != y).sum(1) // 3).all()
