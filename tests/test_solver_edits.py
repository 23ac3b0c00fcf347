"""solver_edits: delegates to the task's solver trajectory, or says which generators to use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dis_core.contract.errors import CapabilityError
from dis_core.contract.interfaces import IGNORE, BuildContext, TaskSpec
from dis_core.contract.reveal import ranked_reveal
from dis_plugins.solver_edits import SolverEditsConfig, build_solver_edits
from dis_plugins.tasks.sudoku import SudokuConfig, build_sudoku


class _PlainTask:
    name = "plain"
    spec = TaskSpec(vocab_size=4, seq_len=3)

    def dataset(self, split):
        raise NotImplementedError


def test_task_without_trajectory_is_a_capability_error(tmp_path):
    ctx = BuildContext(seed=0, n_sup=4, data_dir=tmp_path, task=_PlainTask(), spec=_PlainTask.spec, component="targets")
    with pytest.raises(CapabilityError, match="task 'plain' offers no solver trajectory") as info:
        build_solver_edits(SolverEditsConfig(), ctx)
    for name in ("reveal_path", "mask", "random_replace", "final"):
        assert name in str(info.value)


def test_solver_edits_on_sudoku(tmp_path):
    task = build_sudoku(SudokuConfig(size=4, num_train=6, num_test=2, num_augmentations=1),
                        BuildContext(seed=0, n_sup=3, data_dir=tmp_path))
    ctx = BuildContext(seed=0, n_sup=3, data_dir=tmp_path, task=task, spec=task.spec)
    gen = build_solver_edits(SolverEditsConfig(), ctx)
    assert gen.monotone is True
    batch = {k: torch.from_numpy(v) for k, v in task.dataset("train").get(np.arange(12)).items()}
    out = gen(batch, 3, torch.Generator().manual_seed(0))
    assert out.shape == (12, 3, 16) and out.dtype == torch.int64
    assert torch.equal(out, task.solver_trajectory(batch, 3))  # the task's own solve order, frame for frame
    assert (out[:, -1] == batch["labels"]).all()
    dist = (out != batch["labels"][:, None]).sum(-1)  # (B, 3) Hamming distance to y*
    assert (dist[:, 1:] <= dist[:, :-1]).all()


def test_ranked_reveal_order_counts_and_ignore():
    x = torch.tensor([[0, 0, 0, 0, 7, 0]])
    y = torch.tensor([[1, 2, 3, 4, 7, IGNORE]])
    rank = torch.tensor([[3, 2, 1, 0, 9, 9]])  # reveal cell 3 first, then 2, 1, 0
    out = ranked_reveal(x, y, rank, 2)
    assert out.tolist() == [[[0, 0, 3, 4, 7, IGNORE], [1, 2, 3, 4, 7, IGNORE]]]
    out = ranked_reveal(x, y, rank, 8)  # more frames than cells: floor(s * 4 / 8) cells at frame s
    assert (out != x[:, None]).sum(-1)[0, :].tolist() == [1, 2, 2, 3, 3, 4, 4, 5]  # IGNORE cell counts as changed
