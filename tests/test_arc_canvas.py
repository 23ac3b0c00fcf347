"""The `arc` task on a smaller canvas (`canvas`), its task filter, its `valid_subset` split, and
the CPU-sized ARC recipes (recipes/arc1_cpu.toml and its TRM twin). Tiny shapes, seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from dis_core.contract.errors import DataError, UserError
from dis_core.contract.interfaces import IGNORE, BuildContext, EvalRecord
from dis_plugins.tasks.arc.augment import IDENTITY
from dis_plugins.tasks.arc.canvas import check_canvas
from dis_plugins.tasks.arc.encoding import crop, dihedral, invert, render
from dis_plugins.tasks.arc.evaluator import ArcEvalConfig, build_arc_evaluator
from dis_plugins.tasks.arc.task import ArcConfig, ArcTask

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _write(folder: Path, tasks: dict[str, int], seed: int, n_train: int = 2, n_test: int = 1) -> str:
    """One JSON file per task; `tasks` maps a name to the largest grid side it must reach
    (its first input is exactly that big, every other grid at most 4x4)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, side in tasks.items():
        def grid(big=False):
            h, w = (side, rng.integers(1, side + 1)) if big else rng.integers(1, 5, 2)
            return rng.integers(0, 5, (int(h), int(w))).tolist()
        task = {"train": [{"input": grid(i == 0), "output": grid()} for i in range(n_train)],
                "test": [{"input": grid(), "output": grid()} for _ in range(n_test)]}
        (folder / f"{name}.json").write_text(json.dumps(task))
    return str(folder)


@pytest.fixture
def subsets(tmp_path):
    train = _write(tmp_path / "tr", {"a1": 4, "a2": 9, "a3": 6, "a4": 12}, seed=1, n_train=3)
    test = _write(tmp_path / "te", {"e1": 5, "e2": 11, "e3": 6}, seed=2, n_test=2)
    valid = _write(tmp_path / "va", {"v1": 3, "v2": 20}, seed=3)
    return train, test, valid


def _task(subsets, **kw) -> ArcTask:
    train, test, _ = subsets
    return ArcTask(ArcConfig(train_subsets=(train,), test_subset=test, num_augmentations=kw.pop("num_augmentations", 3), **kw))


def test_small_canvas_round_trips_every_transform():
    rng = np.random.default_rng(0)
    side = 7
    for t in range(8):
        for _ in range(3):
            h, w = rng.integers(1, side + 1, 2)
            g = rng.integers(0, 10, (h, w)).astype(np.uint8)
            cmap = np.concatenate([[0], rng.permutation(np.arange(1, 10))]).astype(np.uint8)
            block = np.zeros((1, side, side), np.uint8)
            block[0, :h, :w] = g
            tokens = render(block, np.array([g.shape]), np.array([t]), cmap[None], np.zeros(1, int), np.zeros(1, int))
            assert tokens.shape == (1, side * side)
            assert np.array_equal(crop(tokens)[0], cmap[dihedral(g, t)])
            assert np.array_equal(invert(crop(tokens)[0], t, cmap), g)


def test_small_canvas_eos_is_drawn_only_where_it_fits():
    block = np.zeros((2, 4, 4), np.uint8)
    block[0, :2, :3] = 3
    block[1] = 5  # a full 4x4 grid: no room for EOS, and none drawn
    tok = render(block, np.array([[2, 3], [4, 4]]), np.zeros(2, int), np.tile(IDENTITY, (2, 1)), np.array([1, 0]), np.array([1, 0]))
    a, b = tok.reshape(2, 4, 4)
    assert a[1:3, 1:4].tolist() == [[5, 5, 5]] * 2 and a[3, 1:4].tolist() == [1, 1, 1] and a[0].sum() == 0
    assert (b == 7).all()
    assert crop(tok)[1].shape == (4, 4)  # a grid that fills the canvas crops whole, with no EOS after it


def test_crop_refuses_a_row_that_is_no_square_canvas():
    with pytest.raises(ValueError, match="square"):
        crop(np.zeros((1, 50), np.uint8))


def test_default_canvas_is_the_reference(subsets):
    """canvas 30 (the default) keeps every task and renders exactly what an unfiltered 30x30 task does."""
    default = _task(subsets)
    explicit = _task(subsets, canvas=30)
    assert default.spec.seq_len == 900 and default.spec.grid_shape == (30, 30)
    assert [p.task_id for p in default.corpus.puzzles] == ["a1", "a2", "a3", "a4", "e1", "e2", "e3"]
    for split in ("train", "test"):
        a, b = default.dataset(split), explicit.dataset(split)
        idx = np.arange(len(a))
        for key, value in a.get(idx).items():
            assert np.array_equal(value, b.get(idx)[key]), key


def test_tasks_that_do_not_fit_are_dropped_and_counted(subsets):
    with capture_logs() as logs:
        task = _task(subsets, canvas=10)
    assert task.spec.seq_len == 100 and task.spec.grid_shape == (10, 10)
    assert [p.task_id for p in task.corpus.puzzles] == ["a1", "a2", "a3", "e1", "e3"]  # a4 (12) and e2 (11) dropped
    assert [t for t, _ in task.test_puzzles] == ["e1", "e3"]
    dropped = {e["subset"]: (e["kept"], e["dropped"]) for e in logs if e["event"].startswith("arc tasks dropped")}
    assert dropped == {subsets[0]: (3, 1), subsets[1]: (2, 1)}
    # the limits count tasks that fit: the first 2 kept ones, not the first 2 listed
    limited = _task(subsets, canvas=10, max_train_puzzles_per_subset=2, max_test_puzzles=1)
    assert [p.task_id for p in limited.corpus.puzzles] == ["a1", "a2", "e1"]


def test_translations_stay_inside_the_small_canvas(subsets):
    task = _task(subsets, canvas=10, num_augmentations=6)
    train = task.dataset("train")
    batch = train.get(np.arange(len(train)))
    assert batch["inputs"].shape == (len(train), 100)
    corpus = task.corpus
    puz, var, e, _ = train.decode(np.arange(len(train)))
    moved = 0
    for r in range(len(train)):
        row = corpus.var_offset[puz[r]] + var[r]
        pair = corpus.pair_offset[puz[r]] + e[r]
        for side, key in ((0, "inputs"), (1, "labels")):
            h, w = corpus.shapes[pair, side]
            want = corpus.var_map[row][dihedral(corpus.grids[pair, side, :h, :w], corpus.var_tid[row])]
            tokens = np.where(batch[key][r] == IGNORE, 0, batch[key][r]).reshape(10, 10)
            rows, cols = np.nonzero(tokens >= 2)
            r0, c0 = rows.min(), cols.min()
            moved += (r0, c0) != (0, 0)
            # the whole grid is there, uncut, at its offset: translation never pushes it off the canvas
            assert np.array_equal(tokens[r0:r0 + want.shape[0], c0:c0 + want.shape[1]] - 2, want)
    assert moved > 0  # some examples were translated at all


def test_canvas_errors_name_the_key(subsets):
    for bad in (1, 0, 31):
        with pytest.raises(UserError, match="task.config.canvas"):
            check_canvas(bad)
        with pytest.raises(UserError, match="task.config.canvas"):
            _task(subsets, canvas=bad)
    # a subset none of whose tasks fits: the key that listed it, and the canvas that would fit
    with pytest.raises(UserError, match=r"task.config.test_subset.*at least 5"):
        _task(subsets, canvas=4)
    task = _task(subsets, canvas=8)
    with pytest.raises(DataError, match="8x8 canvas"):
        task.encode_inputs([np.ones((9, 2), int).tolist()])
    assert task.encode_inputs([[[1, 2], [3, 4]]])["inputs"].shape == (1, 64)
    assert task.render_grid(np.zeros(64)).shape == (8, 8, 3)
    assert task.decode(task.encode_inputs([[[1, 2], [3, 4]]])["inputs"][0]) == [[1, 2], [3, 4]]


def test_valid_subset_is_a_second_held_out_split(subsets, tmp_path):
    train, test, valid = subsets
    task = _task(subsets, canvas=10, valid_subset=valid)
    assert task.valid_puzzles == [("v1", 1)] and [t for t, _ in task.test_puzzles] == ["e1", "e3"]
    tr, va, te = (task.dataset(s) for s in ("train", "valid", "test"))
    vb, tb = va.get(np.arange(len(va))), te.get(np.arange(len(te)))
    assert set(vb["arc_task"].tolist()) == {2} and set(tb["arc_task"].tolist()) == {0, 1}  # valid numbered after test
    # the test split is the same with or without a validation subset; its demonstrations are trained on
    plain = _task(subsets, canvas=10)
    for key in ("inputs", "labels", "arc_task", "arc_pair"):
        assert np.array_equal(tb[key], plain.dataset("test").get(np.arange(len(te)))[key])
    v1 = task.corpus.puzzles.index(next(p for p in task.corpus.puzzles if p.task_id == "v1"))
    trained = set(tr.decode(np.arange(len(tr)))[0].tolist())
    assert v1 in trained
    # one evaluator scores either split against its own task list
    ev = build_arc_evaluator(ArcEvalConfig(pass_ks=(1,)), BuildContext(seed=0, n_sup=2, data_dir=tmp_path, task=task, spec=task.spec))
    for ds, want_total in ((va, 1.0), (te, 2.0)):
        ev.reset()
        batch = {k: torch.from_numpy(v) for k, v in ds.get(np.arange(len(ds))).items()}
        oracle = torch.where(batch["labels"] == IGNORE, 0, batch["labels"])
        ev.update(EvalRecord(batch=batch, preds=oracle[:, None].repeat(1, 2, 1), q_halt=torch.zeros(len(oracle)),
                             steps=torch.full((len(oracle),), 2)))
        out = tmp_path / f"ev{want_total}"
        assert ev.compute([ev.state()], out) == {"pass@1": 1.0, "tasks_evaluated": want_total, "tasks_total": want_total}
        names = sorted(json.loads((out / "submission.json").read_text()))
        assert names == (["v1"] if want_total == 1.0 else ["e1", "e3"])
    # without one, the error says how to get one; a validation subset must be held out of the others
    with pytest.raises(UserError, match="valid_subset"):
        plain.dataset("valid")
    with pytest.raises(UserError, match="valid_subset"):
        _task(subsets, canvas=10, valid_subset=test)


@pytest.mark.parametrize("name", ["arc1_cpu.toml", "arc1_cpu_trm.toml"])
def test_cpu_recipes_load_and_build(name, tmp_path):
    """Both CPU recipes resolve and pass `dis check` with tiny data (2 tasks a subset, 1 variant)."""
    from dis_core.tools.kit import check_recipe
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe

    registry = load_registry()
    resolved = load_recipe(RECIPES / name, registry, [
        "task.config.max_train_puzzles_per_subset=2", "task.config.max_test_puzzles=2", "task.config.num_augmentations=1",
        "train.threads=1"])
    cfg = resolved.recipe.task.config
    assert cfg["canvas"] == 6 and cfg["valid_subset"] == "conceptarc"
    # the held-out test inputs are those of ARC-AGI-1's training tasks; its evaluation tasks are trained on whole
    assert cfg["test_subset"] == "arc1/training" and cfg["train_subsets"] == ["arc1/evaluation"]
    rows = check_recipe(resolved, registry, data_dir=tmp_path / "data", batch_size=2)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad


def test_cpu_recipes_are_twins_at_equal_training_compute():
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe

    registry = load_registry()
    dis, trm = (load_recipe(RECIPES / n, registry, []).recipe for n in ("arc1_cpu.toml", "arc1_cpu_trm.toml"))
    assert dis.task == trm.task and dis.train.steps == trm.train.steps
    assert dis.train.global_batch_size == trm.train.global_batch_size and dis.train.optimizer == trm.train.optimizer
    assert dis.targets.name == "reveal_path" and trm.targets.name == "final" and trm.halting.name == "act"


def test_reference_layout_export_refuses_a_small_canvas(subsets, tmp_path):
    from dis_plugins.tasks.arc.reference_layout import export_reference_layout

    with pytest.raises(UserError, match="task.config.canvas"):
        export_reference_layout(_task(subsets, canvas=10), tmp_path / "out")
