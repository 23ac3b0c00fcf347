"""Evaluators `exact` and `nqueens` on hand-built predictions."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from dis_core.contract.errors import CapabilityError
from dis_core.contract.interfaces import IGNORE, BuildContext, EvalRecord, TaskSpec
from dis_plugins.evaluators import ExactConfig, build_exact
from dis_plugins.tasks.nqueens import EMPTY, QUEEN, NQueensConfig, NQueensEvalConfig, NQueensTask, build_nqueens_evaluator


def record(inputs, labels, preds, steps=None):
    b, n = preds.shape[:2]
    return EvalRecord(
        batch={"inputs": inputs, "labels": labels, "puzzle_ids": torch.zeros(b, dtype=torch.long),
               "example_ids": torch.arange(b)},
        preds=preds, q_halt=torch.zeros(b), steps=torch.full((b,), n) if steps is None else steps,
    )


def exact_eval(tmp_path):
    return build_exact(ExactConfig(), BuildContext(seed=0, n_sup=3, data_dir=tmp_path))


def test_exact_metrics_by_hand(tmp_path):
    labels = torch.tensor([[1, 2, 3, 4], [1, 1, IGNORE, IGNORE]])
    inputs = torch.zeros_like(labels)
    preds = torch.tensor([
        [[0, 0, 0, 0], [1, 2, 0, 0], [1, 2, 3, 0]],  # distances 4, 2, 1
        [[1, 1, 5, 5], [1, 0, 5, 5], [1, 1, 0, 0]],  # 0, 1, 0 (IGNORE cells never count)
    ])
    ev = exact_eval(tmp_path)
    ev.update(record(inputs, labels, preds))
    m = ev.compute([ev.state()], None)
    assert m["count"] == 2
    assert m["accuracy"] == pytest.approx((3 / 4 + 1) / 2)
    assert m["exact_accuracy"] == pytest.approx(0.5)
    assert (m["hamming@1"], m["hamming@2"], m["hamming@3"]) == (2.0, 1.5, 0.5)
    # pairs: (4->2 improve), (2->1 improve), (0->1 worse), (1->0 improve)
    assert m["improving_steps"] == pytest.approx(3 / 4)
    assert m["non_worsening_steps"] == pytest.approx(3 / 4)


def test_exact_uses_each_examples_last_step(tmp_path):
    labels = torch.tensor([[1, 2]])
    preds = torch.tensor([[[1, 2], [0, 0]]])  # halted after step 1; step 2 was never run
    ev = exact_eval(tmp_path)
    ev.update(record(torch.zeros_like(labels), labels, preds, steps=torch.tensor([1])))
    m = ev.compute([ev.state()], None)
    assert m["exact_accuracy"] == 1.0 and "hamming@2" not in m and "improving_steps" not in m


def test_exact_merging_states_equals_one_pass(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(1, 4, (10, 6), generator=g)
    labels[:3, -2:] = IGNORE
    preds = torch.randint(1, 4, (10, 3, 6), generator=g)
    preds[4] = labels[4].clamp_min(0)  # one exact example
    inputs = torch.zeros_like(labels)
    whole, a, b = exact_eval(tmp_path), exact_eval(tmp_path), exact_eval(tmp_path)
    whole.update(record(inputs, labels, preds))
    a.update(record(inputs[:4], labels[:4], preds[:4]))
    b.update(record(inputs[4:7], labels[4:7], preds[4:7]))
    b.update(record(inputs[7:], labels[7:], preds[7:]))
    states = pickle.loads(pickle.dumps([a.state(), b.state()]))
    merged, one = whole.compute(states, None), whole.compute([whole.state()], None)
    assert merged.keys() == one.keys() and all(merged[k] == pytest.approx(one[k]) for k in one)
    assert one["exact_accuracy"] == pytest.approx(0.1)
    whole.reset()
    assert whole.compute([whole.state()], None) == {"count": 0.0}


def queens_board(cols):
    n = len(cols)
    board = torch.full((n * n,), EMPTY)
    board[torch.arange(n) * n + torch.tensor(cols)] = QUEEN
    return board


def test_nqueens_valid_alternative_is_valid_but_not_exact(tmp_path):
    task = NQueensTask(NQueensConfig(board_size=6, num_train=1, num_test=1))
    ev = build_nqueens_evaluator(NQueensEvalConfig(), BuildContext(seed=0, n_sup=2, data_dir=tmp_path, task=task, spec=task.spec))
    sol_a, sol_b = queens_board([1, 3, 5, 0, 2, 4]), queens_board([4, 2, 0, 5, 3, 1])  # two 6-queens solutions
    no_givens = torch.full((36,), EMPTY)
    given_a = no_givens.clone()
    given_a[0 * 6 + 1] = QUEEN  # (0, 1) is in sol_a only
    broken = sol_a.clone()
    broken[1], broken[0] = EMPTY, QUEEN  # attacks along column 0
    inputs = torch.stack([no_givens, no_givens, given_a, no_givens])
    labels = torch.stack([sol_a, sol_a, sol_a, sol_a])
    final = torch.stack([sol_a, sol_b, sol_b, broken])  # exact, valid alternative, drops a given, attacks
    first = torch.stack([broken, broken, sol_b, sol_a])
    preds = torch.stack([first, final], dim=1)  # (B, 2, L)
    ev.update(record(inputs, labels, preds))
    m = ev.compute([ev.state()], None)
    assert m["count"] == 4
    assert m["valid_solution_rate"] == pytest.approx(2 / 4)
    assert m["exact_accuracy"] == pytest.approx(1 / 4)
    assert m["valid@1"] == pytest.approx(1 / 4) and m["valid@2"] == pytest.approx(2 / 4)


def test_nqueens_merge_and_capability(tmp_path):
    task = NQueensTask(NQueensConfig(board_size=6, num_train=1, num_test=8))
    ctx = BuildContext(seed=0, n_sup=1, data_dir=tmp_path, task=task, spec=task.spec)
    b = {k: torch.from_numpy(v) for k, v in task.dataset("test").get(np.arange(8)).items()}
    preds = b["labels"].clone()[:, None, :]
    preds[5:, 0, :6] = EMPTY  # remove the first-row queen of three boards
    whole, p, q = (build_nqueens_evaluator(NQueensEvalConfig(), ctx) for _ in range(3))
    whole.update(record(b["inputs"], b["labels"], preds))
    p.update(record(b["inputs"][:3], b["labels"][:3], preds[:3]))
    q.update(record(b["inputs"][3:], b["labels"][3:], preds[3:]))
    one, merged = whole.compute([whole.state()], None), whole.compute([p.state(), q.state()], None)
    assert one == merged and one["valid_solution_rate"] == pytest.approx(5 / 8)
    bad = BuildContext(seed=0, n_sup=1, data_dir=tmp_path, spec=TaskSpec(vocab_size=3, seq_len=10))
    with pytest.raises(CapabilityError):
        build_nqueens_evaluator(NQueensEvalConfig(), bad)
