"""Task nqueens: generation, augmentation, determinism, solver trajectory, validity check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dis_core.wiring.config import structure
from dis_core.contract.errors import UserError
from dis_plugins.tasks.nqueens import (
    EMPTY,
    QUEEN,
    NQueensConfig,
    NQueensTask,
    build_nqueens,
    dihedral_perms,
    valid_solutions,
)
from dis_core.contract.interfaces import BuildContext, Dataset


def small(**kw):
    kw = {"num_train": 20, "num_test": 10, **kw}
    return NQueensTask(NQueensConfig(**kw))


def tensors(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def all_of(ds):
    return ds.get(np.arange(len(ds)))


def test_default_sizes_and_spec(tmp_path):
    task = build_nqueens(NQueensConfig(), BuildContext(seed=0, n_sup=8, data_dir=tmp_path))
    assert (task.spec.vocab_size, task.spec.seq_len, task.spec.grid_shape, task.spec.num_puzzle_ids) == (3, 64, (8, 8), 1)
    train, test = task.dataset("train"), task.dataset("test")
    assert isinstance(train, Dataset)
    assert (len(train), len(test)) == (800 * 9, 200)
    with pytest.raises(UserError, match="splits"):
        task.dataset("dev")  # "valid" is the validation split (tests/test_valid_split.py)


def test_labels_are_valid_and_givens_consistent():
    for n in (6, 8):
        task = small(board_size=n)
        for split in ("train", "test"):
            b = all_of(task.dataset(split))
            assert set(np.unique(b["inputs"])) <= {EMPTY, QUEEN} and set(np.unique(b["labels"])) <= {EMPTY, QUEEN}
            assert valid_solutions(torch.from_numpy(b["labels"]), torch.from_numpy(b["inputs"]), n).all()
            given = (b["inputs"] == QUEEN).sum(-1)
            assert given.min() >= 0 and given.max() <= n - 1
            assert (b["puzzle_ids"] == 0).all() and (b["example_ids"] == np.arange(len(b["inputs"]))).all()


def test_num_given_range_is_respected():
    b = all_of(small(min_given=2, max_given=3, num_train=40).dataset("train"))
    given = (b["inputs"] == QUEEN).sum(-1)
    assert set(given.tolist()) == {2, 3}
    with pytest.raises(ValueError):
        NQueensConfig(min_given=5, max_given=3)


def test_augmentation_variants_are_dihedral_images():
    task = small(board_size=6, num_train=5)
    ds = task.dataset("train")
    assert len(ds) == 5 * 9
    b = ds.get(np.arange(9))  # the 9 variants of puzzle 0
    boards = b["labels"].reshape(9, 6, 6)
    base = boards[0]
    images = [np.rot90(base, k) for k in range(4)] + [np.fliplr(np.rot90(base, k)) for k in range(4)]
    for v in range(8):
        assert (boards[v + 1] == images[v]).all()
    assert (boards[1] == boards[0]).all()  # the reference's duplicate identity
    assert valid_solutions(torch.from_numpy(b["labels"]), torch.from_numpy(b["inputs"]), 6).all()
    assert len(small(augment=False).dataset("train")) == 20
    assert len(task.dataset("test")) == 10  # test is never augmented


def test_dihedral_transforms_keep_solutions():
    b = all_of(small(board_size=8, augment=False).dataset("test"))
    perms = torch.from_numpy(dihedral_perms(8))
    labels, inputs = torch.from_numpy(b["labels"]), torch.from_numpy(b["inputs"])
    for p in perms:
        assert valid_solutions(labels[:, p], inputs[:, p], 8).all()


def test_determinism_and_purity():
    a, b = small(seed=3), small(seed=3)
    idx = np.array([7, 0, 150, 7])
    ba, bb = a.dataset("train").get(idx), b.dataset("train").get(idx)
    for k in ba:
        assert (ba[k] == bb[k]).all()
    assert (ba["inputs"][0] == ba["inputs"][3]).all()
    assert (ba["example_ids"] == idx).all()
    other = small(seed=4).dataset("train").get(idx)
    assert not (other["labels"] == ba["labels"]).all()
    # train and test come from different seeds
    assert not (all_of(a.dataset("test"))["labels"] == a.dataset("train").get(np.arange(0, 90, 9))["labels"]).all()
    with pytest.raises(IndexError):
        a.dataset("test").get(np.array([10]))


def test_solver_trajectory_is_nested_and_ends_at_labels():
    task = small(board_size=8, min_given=0, max_given=3)
    batch = tensors(task.dataset("test").get(np.arange(10)))
    n_sup = 4
    frames = task.solver_trajectory(batch, n_sup)
    x, y = batch["inputs"], batch["labels"]
    assert frames.shape == (10, n_sup, 64)
    assert torch.equal(frames[:, -1], y)
    q = frames == QUEEN  # (B, N, L)
    assert (q[:, 1:] >= q[:, :-1]).all()  # nested
    assert (q >= (x == QUEEN)[:, None]).all()  # givens always shown
    assert (q <= (y == QUEEN)[:, None]).all()  # only label queens
    missing = ((y == QUEEN) & (x != QUEEN)).sum(-1)
    for s in range(1, n_sup + 1):
        assert torch.equal(q[:, s - 1].sum(-1) - (x == QUEEN).sum(-1), (s * missing) // n_sup)
    # row order: a revealed queen's rows all come before every hidden missing queen's row
    rows = torch.arange(64) // 8
    for b in range(10):
        for s in range(n_sup):
            shown = rows[q[b, s] & (x[b] != QUEEN)]
            hidden = rows[(y[b] == QUEEN) & ~q[b, s]]
            if len(shown) and len(hidden):
                assert shown.max() < hidden.min()


def test_valid_solutions_rejects_bad_boards():
    n = 6
    cols = [1, 3, 5, 0, 2, 4]  # a 6-queens solution
    good = torch.full((n * n,), EMPTY)
    good[torch.arange(n) * n + torch.tensor(cols)] = QUEEN
    empty_in = torch.full((n * n,), EMPTY)
    attack = good.clone()
    attack[0 * n + 1], attack[0 * n + 0] = EMPTY, QUEEN  # queen (0,0) sees (3,0) on its column
    missing = good.clone()
    missing[1] = EMPTY
    pad = good.clone()
    pad[2] = 0
    diag = torch.full((n * n,), EMPTY)
    diag[torch.arange(n) * n + torch.arange(n)] = QUEEN  # n queens, one per row and column, all on one diagonal
    given_elsewhere = empty_in.clone()
    given_elsewhere[0] = QUEEN  # a given queen at (0,0) that `good` does not keep
    boards = torch.stack([good, attack, missing, pad, diag, good])
    inputs = torch.stack([empty_in] * 5 + [given_elsewhere])
    assert valid_solutions(boards, inputs, n).tolist() == [True, False, False, False, False, False]


def test_config_from_recipe_table():
    cfg, errors = structure({"board_size": 6, "max_given": 2}, NQueensConfig, "$.task.config")
    assert not errors and cfg.given_range == (0, 2)
    _, errors = structure({"board_size": 3}, NQueensConfig, "$.task.config")
    assert errors
