"""The validation split of the builtin tasks: held out of training, distinct from test, built only
when asked for, and leaving the train and test splits exactly as they were before it existed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dis_core.contract.errors import UserError
from dis_plugins.tasks.arc.task import ArcTask
from dis_plugins.tasks.maze import MazeConfig, MazeTask
from dis_plugins.tasks.nqueens import NQueensConfig, NQueensTask
from dis_plugins.tasks.sudoku import SudokuConfig, SudokuTask

# sha256 (first 16 hex digits) of every array of each split, computed with the code before the
# validation split existed: its train and test splits must not change.
BEFORE = {
    "nqueens": {"train": "c9e6b2e87359d976", "test": "20deb4e4da83e225"},
    "sudoku": {"train": "280b4cda2ca5aab7", "test": "0e9b882b151a7299"},
    "maze": {"train": "5a6dadcb3ba933db", "test": "8b0066185b681c7c"},
}


def digest(ds) -> str:
    h = hashlib.sha256()
    batch = ds.get(np.arange(len(ds)))
    for key in sorted(batch):
        h.update(key.encode())
        h.update(np.ascontiguousarray(batch[key]).tobytes())
    return h.hexdigest()[:16]


def make(task: str, tmp_path, **config):
    if task == "nqueens":
        return NQueensTask(NQueensConfig(**{"board_size": 6, "num_train": 60, "num_test": 20, **config}))
    if task == "sudoku":
        return SudokuTask(SudokuConfig(**{"size": 4, "num_train": 100, "num_test": 30, "num_augmentations": 2, **config}),
                          tmp_path)
    return MazeTask(MazeConfig(**{"rows": 7, "cols": 7, "num_train": 30, "num_test": 10, "min_path_length": 4, **config}),
                    tmp_path)


def questions(ds) -> set[bytes]:
    return {bytes(q) for q in ds.get(np.arange(len(ds)))["inputs"].astype(np.uint8)}


@pytest.mark.parametrize("task", ["nqueens", "sudoku", "maze"])
def test_valid_is_disjoint_from_train_and_test_which_do_not_change(task, tmp_path):
    t = make(task, tmp_path)
    valid = t.dataset("valid")  # asked for first: train and test are built for it, as they always were
    assert {s: digest(t.dataset(s)) for s in ("train", "test")} == BEFORE[task]
    assert len(valid) == len(t.dataset("test"))  # num_valid defaults to num_test, never augmented
    seen = questions(t.dataset("train")) | questions(t.dataset("test"))  # the training examples, augmented ones included
    assert not questions(valid) & seen
    assert len(questions(valid)) > len(valid) // 2  # real puzzles, not one repeated
    b = valid.get(np.arange(len(valid)))
    assert (b["example_ids"] == np.arange(len(valid))).all() and b["labels"].shape == b["inputs"].shape
    # a fresh task that never builds the validation split gives the same train and test
    fresh = make(task, tmp_path / "fresh")
    assert {s: digest(fresh.dataset(s)) for s in ("train", "test")} == BEFORE[task]
    # its own size, and the same puzzles every time (cached generated banks included)
    sized = make(task, tmp_path, num_valid=7).dataset("valid")
    again = make(task, tmp_path, num_valid=7).dataset("valid")
    assert len(sized) == 7 and digest(sized) == digest(again)
    with pytest.raises(UserError, match="'train', 'test' and 'valid'"):
        t.dataset("dev")


def test_nqueens_valid_boards_are_valid_puzzles():
    from dis_plugins.tasks.nqueens import consistent_givens, valid_solutions

    import torch

    t = NQueensTask(NQueensConfig(board_size=6, num_train=60, num_test=20))
    b = t.dataset("valid").get(np.arange(20))
    labels, inputs = torch.as_tensor(b["labels"]), torch.as_tensor(b["inputs"])
    assert valid_solutions(labels, inputs, 6).all() and consistent_givens(inputs, 6).all()


def _csv(path, bank_q, bank_a, chars) -> None:
    lines = ["source,question,answer,rating"]
    for q, a in zip(bank_q, bank_a):
        lines.append(f"gen,{''.join(chars[v] for v in q)},{''.join(chars[v] for v in a)},0")
    path.write_text("\n".join(lines) + "\n")


def test_imported_data_valid_fraction_carves_the_training_puzzles(tmp_path):
    gen = make("sudoku", tmp_path, cache=False)
    train = gen.bank("train")
    _csv(tmp_path / "train.csv", train["question"], train["solution"], ".123456789")
    base = {"size": 4, "num_augmentations": 0, "csv_train": tmp_path / "train.csv", "cache": False}
    plain = SudokuTask(SudokuConfig(**base), tmp_path)
    assert len(plain.dataset("train")) == 100  # unchanged without valid_fraction
    with pytest.raises(UserError, match="task sudoku has no validation split.*set task.config.valid_fraction"):
        plain.dataset("valid")
    carved = SudokuTask(SudokuConfig(**base, valid_fraction=0.2), tmp_path)
    tr, va = questions(carved.dataset("train")), questions(carved.dataset("valid"))
    assert len(carved.dataset("valid")) == 20 and len(carved.dataset("train")) == 80
    assert not tr & va and tr | va == questions(plain.dataset("train"))
    with pytest.raises(UserError, match="valid_fraction holds out imported training puzzles"):
        SudokuTask(SudokuConfig(size=4, valid_fraction=0.1), tmp_path)

    maze = make("maze", tmp_path, cache=False)
    bank = maze.bank("train")
    _csv(tmp_path / "maze.csv", bank["question"], bank["label"], "?# SGo")
    cfg = {"rows": 7, "cols": 7, "csv_train": tmp_path / "maze.csv", "csv_test": tmp_path / "maze.csv"}
    with pytest.raises(UserError, match="task maze has no validation split"):
        MazeTask(MazeConfig(**cfg), tmp_path).dataset("valid")
    carved = MazeTask(MazeConfig(**cfg, valid_fraction=0.1), tmp_path)
    assert (len(carved.dataset("train")), len(carved.dataset("valid"))) == (27, 3)
    assert not questions(carved.dataset("train")) & questions(carved.dataset("valid"))


def test_arc_says_it_has_no_validation_split():
    with pytest.raises(UserError, match="task arc has no validation split.*test_subset"):
        ArcTask.dataset(object.__new__(ArcTask), "valid")


def test_eval_split_is_a_recipe_choice(tmp_path, registry):
    from conftest import tiny_recipe
    from dis_core.contract.errors import RecipeError
    from dis_core.wiring.recipe import load_recipe

    recipe = tiny_recipe(tmp_path)
    assert load_recipe(recipe, registry).recipe.eval.split == "test"
    assert load_recipe(recipe, registry, ['eval.split="valid"']).recipe.eval.split == "valid"
    with pytest.raises(RecipeError, match=r"expected one of 'test', 'valid'\) @ \$.eval.split"):
        load_recipe(recipe, registry, ['eval.split="train"'])
