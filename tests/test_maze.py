"""Maze task: shortest-path labels, augmentation, CSV import, evaluator, solver trajectory."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from dis_core.contract.errors import DataError, UserError
from dis_core.contract.interfaces import BuildContext, EvalRecord
from dis_plugins.tasks.maze import MazeConfig, build_maze, build_maze_evaluator, valid_paths
from dis_plugins.tasks.maze_puzzles import CHARSET, GOAL, OPEN, PATH, START, WALL


def _task(tmp_path, **kw):
    cfg = MazeConfig(**{"rows": 11, "cols": 11, "num_train": 12, "num_test": 4, "min_path_length": 12, **kw})
    return build_maze(cfg, BuildContext(seed=0, n_sup=6, data_dir=tmp_path))


def _bfs(grid):
    """Plain BFS (independent of the task's code) -> distance from S to G."""
    R, C = grid.shape
    s = tuple(np.argwhere(grid == START)[0])
    dist = {s: 0}
    q = deque([s])
    while q:
        r, c = q.popleft()
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < R and 0 <= nc < C and grid[nr, nc] != WALL and (nr, nc) not in dist:
                dist[(nr, nc)] = dist[(r, c)] + 1
                q.append((nr, nc))
    return dist[tuple(np.argwhere(grid == GOAL)[0])]


def _check_label(x, y, shape):
    """The label marks a connected S..G path of exactly the BFS distance, nothing else changed."""
    grid, lab = x.reshape(shape), y.reshape(shape)
    assert ((lab == x.reshape(shape)) | ((grid == OPEN) & (lab == PATH))).all()
    d = _bfs(grid)
    assert (lab == PATH).sum() == d - 1
    assert _bfs(np.where((lab == PATH) | (lab == START) | (lab == GOAL), lab, WALL)) == d


def test_labels_are_shortest_paths(tmp_path):
    task = _task(tmp_path)
    assert task.spec.vocab_size == 6 and task.spec.seq_len == 121 and task.spec.grid_shape == (11, 11)
    b = task.dataset("train").get(np.arange(12))
    assert (b["example_ids"] == np.arange(12)).all() and (b["puzzle_ids"] == 0).all()
    for x, y in zip(b["inputs"], b["labels"]):
        _check_label(x, y, (11, 11))
        assert _bfs(x.reshape(11, 11)) >= 12
    lengths = task.bank("train")["length"]
    assert (lengths == (b["labels"] == PATH).sum(1) + 1).all()


def _distances(grid, source):
    """BFS distance from `source` to every reachable open cell."""
    R, C = grid.shape
    dist, q = {source: 0}, deque([source])
    while q:
        r, c = q.popleft()
        for n in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= n[0] < R and 0 <= n[1] < C and grid[n] != WALL and n not in dist:
                dist[n] = dist[(r, c)] + 1
                q.append(n)
    return dist


def _loops(grid) -> int:
    """Independent cycles of the open cells (edges - cells + 1 for a connected maze; 0 for a tree)."""
    open_ = grid != WALL
    edges = int((open_[1:] & open_[:-1]).sum() + (open_[:, 1:] & open_[:, :-1]).sum())
    return edges - int(open_.sum()) + 1


def _several_shortest_paths(grid) -> bool:
    s, g = (tuple(np.argwhere(grid == t)[0]) for t in (START, GOAL))
    from_s, from_g = _distances(grid, s), _distances(grid, g)
    d = from_s[g]
    return sum(1 for cell in from_s if from_s[cell] + from_g.get(cell, d + 1) == d) > d + 1


def test_non_square_and_loops(tmp_path):
    task = _task(tmp_path, rows=9, cols=14, loop_fraction=0.3, unique_path=False, augment=True)
    ds = task.dataset("train")
    assert len(ds) == 12 * 4  # the shape-preserving dihedral transforms only
    b = ds.get(np.arange(48))
    for x, y in zip(b["inputs"], b["labels"]):
        _check_label(x, y, (9, 14))  # a shortest path, on a board of 9 rows and 14 columns
    grids = [x.reshape(9, 14) for x in b["inputs"]]
    assert all(_loops(g) > 0 for g in grids)  # walls knocked down: cycles in every maze
    assert any(_several_shortest_paths(g) for g in grids)  # unique_path = false lets those in
    # Without loop_fraction the maze is a tree; with unique_path, one shortest path each.
    trees = _task(tmp_path / "trees", rows=9, cols=14, loop_fraction=0.0).dataset("train").get(np.arange(12))["inputs"]
    assert all(_loops(x.reshape(9, 14)) == 0 for x in trees)
    unique = _task(tmp_path / "unique", rows=9, cols=14, loop_fraction=0.3).dataset("train").get(np.arange(12))["inputs"]
    assert not any(_several_shortest_paths(x.reshape(9, 14)) for x in unique)


def test_dihedral_augmentation_keeps_validity(tmp_path):
    task = _task(tmp_path, augment=True)
    ds = task.dataset("train")
    assert len(ds) == 96 and len(task.dataset("test")) == 4
    b = ds.get(np.arange(16))
    assert len({bytes(r.astype(np.uint8)) for r in b["inputs"][:8]}) == 8  # 8 distinct variants
    for x, y in zip(b["inputs"], b["labels"]):
        _check_label(x, y, (11, 11))
    assert (ds.get(np.array([9]))["labels"] == b["labels"][9]).all()  # pure in the index


def test_generation_is_seeded_and_cached(tmp_path):
    a = _task(tmp_path).bank("train")["question"]
    assert list((tmp_path / "maze").glob("train-11x11-*.npz"))
    b = _task(tmp_path / "other").bank("train")["question"]
    assert (a == b).all()
    c = _task(tmp_path, seed=1, cache=False).bank("train")["question"]
    assert (a != c).any()
    with pytest.raises(UserError, match="loop_fraction"):
        _task(tmp_path, loop_fraction=1.5)


def _to_text(tokens):
    return "".join(CHARSET[t - 1] for t in tokens)


def _write_csv(path, rows):
    path.write_text("source,question,answer,rating\n" + "".join(f"{r}\n" for r in rows))
    return str(path)


def test_csv_import(tmp_path):
    task = _task(tmp_path)
    b = task.dataset("train").get(np.arange(3))
    rows = [f"gen,{_to_text(x)},{_to_text(y)},0" for x, y in zip(b["inputs"], b["labels"])]
    path = _write_csv(tmp_path / "maze.csv", rows)
    imported = _task(tmp_path, csv_train=path, augment=True)
    got = imported.dataset("train").get(np.arange(0, 24, 8))  # the identity variants
    assert (got["inputs"] == b["inputs"]).all() and (got["labels"] == b["labels"]).all()
    # a file that marks S and G as path cells in the answer is read the same way
    y = _to_text(b["labels"][0])
    x = _to_text(b["inputs"][0])
    marked = "".join("o" if ch in "SG" else ch for ch in y)
    other = _task(tmp_path, csv_test=_write_csv(tmp_path / "sg.csv", [f"g,{x},{marked},0"])).dataset("test")
    assert (other.get(np.arange(1))["labels"][0] == b["labels"][0]).all()


def test_csv_errors_name_file_and_line(tmp_path):
    b = _task(tmp_path).dataset("train").get(np.arange(1))
    x, y = _to_text(b["inputs"][0]), _to_text(b["labels"][0])
    wall_at = x.index("#")
    cases = [
        (f"g,{x[:-1]},{y},0", "121 ASCII characters"),
        (f"g,{x[:wall_at]}o{x[wall_at + 1:]},{y},0", "outside '# SG'"),
        (f"g,{x.replace('G', ' ')},{y.replace('G', ' ')},0", "exactly one S and one G"),
        (f"g,{x},{y[:wall_at]} {y[wall_at + 1:]},0", "changes a cell"),
        (f"g,{x},{y[:wall_at]}x{y[wall_at + 1:]},0", "outside '# SGo'"),
    ]
    for row, message in cases:
        path = _write_csv(tmp_path / "bad.csv", [f"ok,{x},{y},0", row])
        with pytest.raises(DataError, match=rf"bad\.csv:3: .*{message}"):
            _task(tmp_path, csv_train=path).dataset("train")
    with pytest.raises(DataError, match="none.csv not found"):
        _task(tmp_path, csv_test=str(tmp_path / "none.csv")).dataset("test")


def test_evaluator_accepts_other_shortest_paths_but_not_longer_ones():
    # A 3x5 room: S at (1,0), G at (1,4); the straight path has length 4.
    grid = np.array([
        [OPEN, OPEN, OPEN, OPEN, OPEN],
        [START, OPEN, OPEN, OPEN, GOAL],
        [OPEN, OPEN, OPEN, OPEN, OPEN],
    ])
    straight = grid.copy()
    straight[1, 1:4] = PATH
    gap = grid.copy()  # the right count of marks, but (1,2) and (0,3) do not touch
    gap[1, 1:3] = PATH
    gap[0, 3] = PATH
    longer = grid.copy()
    longer[0, 0:5] = PATH  # around the top: 6 moves
    extra = straight.copy()
    extra[2, 2] = PATH  # a stray mark
    wall_changed = straight.copy()
    wall_changed[0, 0] = WALL
    preds = np.stack([straight, gap, longer, extra, wall_changed]).reshape(5, -1)
    x = np.repeat(grid.reshape(1, -1), 5, axis=0)
    ok = valid_paths(torch.from_numpy(x), torch.from_numpy(preds), (3, 5))
    assert ok.tolist() == [True, False, False, False, False]
    # Two equally short paths around a pillar: both are valid.
    pillar = np.array([[OPEN, OPEN, OPEN], [START, WALL, GOAL], [OPEN, OPEN, OPEN]])
    up, down = pillar.copy(), pillar.copy()
    up[0, :] = PATH
    down[2, :] = PATH
    ok = valid_paths(torch.from_numpy(np.stack([pillar, pillar]).reshape(2, -1)),
                     torch.from_numpy(np.stack([up, down]).reshape(2, -1)), (3, 3))
    assert ok.tolist() == [True, True]


def test_evaluator_metrics(tmp_path):
    task = _task(tmp_path)
    ctx = BuildContext(seed=0, n_sup=2, data_dir=tmp_path, task=task, spec=task.spec)
    ev = build_maze_evaluator(None, ctx)
    batch = {k: torch.from_numpy(v) for k, v in task.dataset("test").get(np.arange(4)).items()}
    preds = batch["labels"].clone()
    preds[1] = batch["inputs"][1]  # no path at all
    preds[2][preds[2] == PATH] = OPEN
    preds = preds[:, None].repeat(1, 2, 1)  # (4, N=2, L)
    ev.update(EvalRecord(batch=batch, preds=preds, q_halt=torch.zeros(4), steps=torch.full((4,), 2)))
    m = ev.compute([ev.state(), {"count": 0, "valid": 0, "exact": 0}], None)
    assert m == {"valid_path_rate": 0.5, "exact_accuracy": 0.5, "count": 4.0}


def test_solver_trajectory_grows_from_start(tmp_path):
    task = _task(tmp_path)
    batch = {k: torch.from_numpy(v) for k, v in task.dataset("train").get(np.arange(6)).items()}
    frames = task.solver_trajectory(batch, 4)  # (B, 4, L)
    x, y = batch["inputs"], batch["labels"]
    assert frames.shape == (6, 4, 121) and (frames[:, -1] == y).all()
    shown = frames == PATH
    assert (shown[:, 1:] >= shown[:, :-1]).all()
    assert (shown.sum(-1)[:, 0] == (y == PATH).sum(1) // 4).all()
    for b in range(6):  # every frame's path is a prefix starting next to S
        for s in range(4):
            f = frames[b, s].numpy().reshape(11, 11)
            if (f == PATH).any():
                # the marked cells plus S form one connected chain containing S
                cells = {tuple(p) for p in np.argwhere(f == PATH)}
                seen, q = set(), deque([tuple(np.argwhere(f == START)[0])])
                while q:
                    r, c = q.popleft()
                    for n in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                        if n in cells and n not in seen:
                            seen.add(n)
                            q.append(n)
                assert seen == cells
