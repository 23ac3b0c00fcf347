"""The `arc` task and evaluator: encoding, augmentation, split rule, bad data, reference layout, voting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from dis_core.contract.errors import DataError, UserError
from dis_core.contract.interfaces import IGNORE, BuildContext, EvalRecord
from dis_plugins.tasks import arc as arc_plugin
from dis_plugins.tasks.arc.augment import IDENTITY, generate_variants
from dis_plugins.tasks.arc.encoding import INVERSE, crop, dihedral, invert, render
from dis_plugins.tasks.arc.evaluator import ArcEvalConfig, build_arc_evaluator
from dis_plugins.tasks.arc.reference_layout import export_reference_layout
from dis_plugins.tasks.arc.sources import load_subset
from dis_plugins.tasks.arc.task import ArcConfig, ArcTask


def _grid(rng, colours=4, max_side=6):
    h, w = rng.integers(1, max_side + 1, 2)
    return rng.integers(0, colours, (h, w)).tolist()


def _write_tasks(folder, names, seed, n_train=2, n_test=1):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        task = {kind: [{"input": _grid(rng), "output": _grid(rng)} for _ in range(n)] for kind, n in (("train", n_train), ("test", n_test))}
        (folder / f"{name}.json").write_text(json.dumps(task))
    return str(folder)


@pytest.fixture
def dirs(tmp_path):
    train = _write_tasks(tmp_path / "tr", ["a1", "a2", "a3"], seed=1, n_train=3, n_test=1)
    test = _write_tasks(tmp_path / "te", ["e1", "e2"], seed=2, n_train=2, n_test=2)
    return train, test


def _task(dirs, **kw) -> ArcTask:
    train, test = dirs
    return ArcTask(ArcConfig(train_subsets=(train,), test_subset=test, num_augmentations=kw.pop("num_augmentations", 4), **kw))


def _all(ds):
    return ds.get(np.arange(len(ds)))


# ------------------------------------------------------------------------------ encoding


def test_render_matches_numpy_and_crop_invert_round_trips_for_every_transform():
    rng = np.random.default_rng(0)
    for t in range(8):
        for _ in range(4):
            g = np.array(_grid(rng, colours=10, max_side=30), dtype=np.uint8)
            cmap = np.concatenate([[0], rng.permutation(np.arange(1, 10))]).astype(np.uint8)
            block = np.zeros((1, 30, 30), np.uint8)
            block[0, : g.shape[0], : g.shape[1]] = g
            tokens = render(block, np.array([g.shape]), np.array([t]), cmap[None], np.zeros(1, int), np.zeros(1, int))
            want = cmap[dihedral(g, t)]
            assert np.array_equal(crop(tokens)[0], want)
            assert np.array_equal(invert(crop(tokens)[0], t, cmap), g)
            assert np.array_equal(dihedral(dihedral(g, t), INVERSE[t]), g)


def test_canvas_has_eos_row_and_column_and_pad_corner():
    block = np.zeros((1, 30, 30), np.uint8)
    block[0, :2, :3] = [[1, 2, 3], [4, 5, 6]]
    tok = render(block, np.array([[2, 3]]), np.zeros(1, int), IDENTITY[None], np.array([1]), np.array([2])).reshape(30, 30)
    assert tok[1, 2:5].tolist() == [3, 4, 5] and tok[2, 2:5].tolist() == [6, 7, 8]
    assert tok[3, 2:5].tolist() == [1, 1, 1] and tok[1:3, 5].tolist() == [1, 1]  # EOS row and column
    assert tok[3, 5] == 0 and tok[0].sum() == 0 and tok.sum() == 3 + 4 + 5 + 6 + 7 + 8 + 5  # corner stays PAD


def test_crop_takes_the_maximal_area_block():
    tok = np.zeros((30, 30), np.uint8)
    tok[0, :5] = 2  # a 1x5 strip over a 3x2 block: areas 5, 4, 6 -> rows 3, width 2
    tok[1:3, :2] = 3
    assert crop(tok.reshape(1, 900))[0].shape == (3, 2)
    assert crop(np.zeros((1, 900)))[0].shape == (0, 0)


def test_variant_dedup_matches_brute_force_hashing():
    def content(grids, t, m):
        return b"".join(bytes(dihedral(m[g], t).shape) + dihedral(m[g], t).tobytes() for g in grids)

    symmetric = [np.array([[1, 0], [0, 1]], np.uint8), np.array([[0]], np.uint8)]  # 2 classes x 9 maps
    recolour_symmetric = [np.array([[1, 2], [2, 1]], np.uint8)]
    last = [np.array([[3, 0, 1], [0, 0, 2]], np.uint8)]
    for grids in (symmetric, recolour_symmetric, last):
        tids, maps = generate_variants(grids, 100, np.random.default_rng(5))
        r = np.random.default_rng(5)  # replay the same attempts, deduplicating by content
        t = r.integers(0, 8, 500)
        perms = r.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (500, 1)), axis=1)
        seen, kept = {content(grids, 0, IDENTITY)}, []
        for k in range(500):
            m = np.concatenate([[0], perms[k]]).astype(np.uint8)
            c = content(grids, t[k], m)
            if c not in seen and len(kept) < 100:
                seen.add(c)
                kept.append(k)
        assert len(tids) == 1 + len(kept)
        assert tids[1:].tolist() == t[kept].tolist()
        assert (len(tids) < 101) == (grids is not last)  # the symmetric puzzles cannot fill 100 variants


# ------------------------------------------------------------------------------ task and splits


def test_spec_and_batch_keys(dirs):
    task = _task(dirs)
    assert (task.spec.vocab_size, task.spec.seq_len, task.spec.grid_shape) == (12, 900, (30, 30))
    assert task.spec.num_puzzle_ids == 1 + 5 * 5  # 5 tasks x (original + 4 variants) + blank
    b = task.dataset("train").get(np.array([0, 5, 7]))
    assert b["example_ids"].tolist() == [0, 5, 7] and b["inputs"].shape == (3, 900)
    labels = b["labels"]
    assert (labels == IGNORE).any() and (labels == 1).any() and not (labels == 0).any()  # PAD ignored, EOS kept
    with pytest.raises(IndexError):
        task.dataset("test").get(np.array([len(task.dataset("test"))]))


def test_preparation_is_deterministic_for_a_seed(dirs):
    a, b, c = _task(dirs), _task(dirs), _task(dirs, seed=7)
    idx = np.arange(len(a.dataset("train")))
    ba, bb, bc = (t.dataset("train").get(idx) for t in (a, b, c))
    assert all(np.array_equal(ba[k], bb[k]) for k in ba)
    assert not np.array_equal(ba["inputs"], bc["inputs"])


def test_split_rule_and_shared_identifiers(dirs):
    task = _task(dirs)
    train, test = task.dataset("train"), task.dataset("test")
    # train: 3 training tasks x (3 demos + 1 test pair) + 2 test tasks x 2 demos, per round; rounds = 5 variants
    assert len(train) == 5 * (3 * 4 + 2 * 2)
    assert len(test) == 2 * 5 * 2  # every variant of every held-out test pair
    tb, eb = _all(train), _all(test)
    assert set(eb["puzzle_ids"].tolist()) <= set(tb["puzzle_ids"].tolist())  # demos train the held-out ids
    assert set(eb["arc_task"].tolist()) == {0, 1} and set(eb["arc_pair"].tolist()) == {0, 1}
    assert (eb["inputs"].reshape(-1, 30, 30)[:, 0, 0] >= 2).all()  # test grids sit at (0, 0)
    # one pass shows every (task variant, example) once; one example per variant stays at (0, 0)
    at_origin = tb["inputs"].reshape(-1, 30, 30)[:, 0, 0] >= 2
    for pid in np.unique(tb["puzzle_ids"]):
        rows = tb["puzzle_ids"] == pid
        assert rows.sum() in (2, 4) and at_origin[rows].any()
    assert not at_origin.all()  # the rest are translated
    strict = _task(dirs, strict_split=True)
    assert len(strict.dataset("train")) == 5 * 3 * 4
    assert not set(_all(strict.dataset("train"))["puzzle_ids"].tolist()) & set(eb["puzzle_ids"].tolist())
    assert len(_task(dirs, translate=False, num_augmentations=0).dataset("train")) == 16


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"input": [[1, 2], [3]], "output": [[1]]}, "ragged"),
        ({"input": [[1, 10]], "output": [[1]]}, "colour 10"),
        ({"input": [[0] * 31], "output": [[1]]}, "1x31"),
        ({"input": [[1]]}, "missing `output`"),
    ],
)
def test_bad_data_names_file_and_task(tmp_path, bad, words):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "t0bad.json").write_text(json.dumps({"train": [{"input": [[1]], "output": [[2]]}], "test": [bad]}))
    with pytest.raises(DataError) as info:
        load_subset(str(d))
    assert words in str(info.value) and "t0bad" in str(info.value) and str(d / "t0bad.json") in str(info.value)


def test_kaggle_layout_and_missing_solutions(tmp_path):
    task = {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]]}]}
    (tmp_path / "x_evaluation_challenges.json").write_text(json.dumps({"k1": task}))
    with pytest.raises(DataError, match="_solutions.json"):
        load_subset(str(tmp_path / "x_evaluation"))
    (tmp_path / "x_evaluation_solutions.json").write_text(json.dumps({"k1": [[[4]]]}))
    (p,) = load_subset(str(tmp_path / "x_evaluation_challenges.json"))
    assert p.task_id == "k1" and p.test[0][1].tolist() == [[4]]


def test_arc1_evaluation_with_arc2_training_is_refused():
    with pytest.raises(UserError, match="never mix ARC-1 evaluation with ARC-2 training"):
        ArcTask(ArcConfig(train_subsets=("arc2/training",), test_subset="arc1/evaluation", num_augmentations=0))


def test_shipped_subsets():
    concept = load_subset("conceptarc")
    assert len(concept) == 160 and sum(len(p.train) for p in concept) == 427 and sum(len(p.test) for p in concept) == 480
    assert (arc_plugin.sources.CONCEPTARC_DIR.parent / "LICENSE").is_file()
    assert len(load_subset("arc1/evaluation", limit=3)) == 3


# ------------------------------------------------------------------------------ reference layout


def test_reference_layout_round_trip(dirs, tmp_path, monkeypatch):
    monkeypatch.setattr("dis_plugins.tasks.arc.reference_layout.CHUNK", 7)  # several chunks per split
    native = _task(dirs)
    counts = export_reference_layout(native, tmp_path / "ref", progress=False)
    assert counts == {"train": 5 * 16, "test": 20}
    meta = json.loads((tmp_path / "ref" / "train" / "dataset.json").read_text())
    assert meta["num_puzzle_identifiers"] == native.spec.num_puzzle_ids and meta["total_groups"] == 5
    assert np.load(tmp_path / "ref" / "train" / "all__inputs.npy").dtype == np.uint8
    names = json.loads((tmp_path / "ref" / "identifiers.json").read_text())
    assert names[0] == "<blank>" and "|||t" in names[2] and len(names) == native.spec.num_puzzle_ids
    back = ArcTask(ArcConfig(reference_dir=str(tmp_path / "ref")))
    assert back.spec == native.spec and back.test_puzzles == native.test_puzzles
    for split in ("train", "test"):
        a, b = _all(native.dataset(split)), _all(back.dataset(split))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), split
    (tmp_path / "ref" / "test_puzzles.json").unlink()  # HRM writes none: tasks come from the test split
    assert ArcTask(ArcConfig(reference_dir=str(tmp_path / "ref"))).test_puzzles == native.test_puzzles


# ------------------------------------------------------------------------------ evaluator


def _evaluate(task, out_dir, predict, config=ArcEvalConfig(), limit=None):
    ev = build_arc_evaluator(config, BuildContext(seed=0, n_sup=2, data_dir=out_dir, task=task, spec=task.spec))
    size = len(task.dataset("test")) if limit is None else limit  # what train.eval_limit does
    ds = task.dataset("test")
    for start in range(0, size, 7):
        batch = {k: torch.from_numpy(v) for k, v in ds.get(np.arange(start, min(start + 7, size))).items()}
        preds = predict(batch)
        ev.update(EvalRecord(batch=batch, preds=preds[:, None].repeat(1, 2, 1), q_halt=torch.zeros(len(preds)), steps=torch.full((len(preds),), 2)))
    return ev.compute([ev.state()], out_dir)


def _oracle(batch):
    return torch.where(batch["labels"] == IGNORE, 0, batch["labels"])


def test_oracle_predictions_score_100_and_submission_layout(dirs, tmp_path):
    task = _task(dirs)
    metrics = _evaluate(task, tmp_path, _oracle)
    assert metrics == {f"pass@{k}": 1.0 for k in (1, 2, 5, 10, 100, 1000)} | {"tasks_evaluated": 2.0, "tasks_total": 2.0}
    sub = json.loads((tmp_path / "submission.json").read_text())
    test_dir = dirs[1]
    assert sorted(sub) == ["e1", "e2"]
    for name, entries in sub.items():
        truth = json.loads(open(f"{test_dir}/{name}.json").read())["test"]
        assert len(entries) == len(truth) == 2
        for entry, pair in zip(entries, truth):
            assert entry == {"attempt_1": pair["output"], "attempt_2": pair["output"]}


def test_votes_rank_by_count_and_score_partial_or_all_or_nothing(dirs, tmp_path):
    task = _task(dirs)  # 5 variants per test pair: 3 wrong votes beat 2 right ones on task 0, pair 0

    def predict(batch):
        out = _oracle(batch)
        for r in range(len(out)):
            variant = int(batch["example_ids"][r]) // 2  # test order: task -> variant -> pair (2 pairs)
            if batch["arc_task"][r] == 0 and batch["arc_pair"][r] == 0 and variant % 2 == 0:  # variants 0, 2, 4
                out[r] = 0
                out[r, 0], out[r, 1] = 2, 1  # predicts a 1x1 black grid: black is fixed by every colour map
        return out

    m = _evaluate(task, tmp_path, predict)
    assert m["pass@1"] == pytest.approx((0.5 + 1.0) / 2) and m["pass@2"] == 1.0  # partial credit: half of task 0
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert sub["e1"][0]["attempt_1"] == [[0]]
    m = _evaluate(task, tmp_path, predict, ArcEvalConfig(all_or_nothing=True))
    assert m["pass@1"] == pytest.approx(0.5)


def test_pass_at_k_is_over_the_evaluated_tasks(dirs, tmp_path):
    task = _task(dirs)  # test split: 2 tasks x 5 variants x 2 pairs, in the order task -> variant -> pair
    with capture_logs() as logs:
        m = _evaluate(task, tmp_path, _oracle, limit=10)  # task 0 only
    assert m["pass@1"] == m["pass@2"] == 1.0 and (m["tasks_evaluated"], m["tasks_total"]) == (1.0, 2.0)
    assert [e for e in logs if e["log_level"] == "warning" and "evaluated subset" in e["event"]][0]["tasks_evaluated"] == 1
    # A task cut by the limit counts as evaluated; its pairs without a prediction are misses.
    m = _evaluate(task, tmp_path, _oracle, limit=11)  # task 1: pair 0 of variant 0 only
    assert m["pass@1"] == pytest.approx((1.0 + 0.5) / 2) and m["tasks_evaluated"] == 2.0
    with capture_logs() as logs:
        m = _evaluate(task, tmp_path, _oracle)
    assert m["tasks_evaluated"] == m["tasks_total"] == 2.0 and not [e for e in logs if e["log_level"] == "warning"]
    m = _evaluate(_task(dirs, max_test_puzzles=1), tmp_path, _oracle)  # the task list itself shrinks
    assert m["pass@2"] == 1.0 and m["tasks_evaluated"] == m["tasks_total"] == 1.0


def test_submission_skips_empty_grids(dirs, tmp_path):
    task = _task(dirs)

    def predict(batch):
        out = _oracle(batch)
        for r in range(len(out)):
            variant = int(batch["example_ids"][r]) % 10 // 2
            if batch["arc_task"][r] == 1 or (batch["arc_pair"][r] == 0 and variant % 2 == 0):
                out[r] = 0  # all PAD: crops to an empty grid; task 0 pair 0: 3 of 5 votes, top-ranked
        return out

    m = _evaluate(task, tmp_path, predict)
    assert m["pass@1"] == pytest.approx(0.5 * 0.5) and m["pass@2"] == pytest.approx(0.5)  # the empty grid ranks, and misses
    sub = json.loads((tmp_path / "submission.json").read_text())
    truth = json.loads(open(f"{dirs[1]}/e1.json").read())["test"][0]["output"]
    assert sub["e1"][0] == {"attempt_1": truth, "attempt_2": truth}  # the next-ranked non-empty grid, repeated
    assert sub["e2"] == [{"attempt_1": [[0]], "attempt_2": [[0]]}] * 2  # only empty grids: a 1x1 black guess


def test_registers_task_and_evaluator():
    from dis_core.wiring.plugins import load_registry

    reg = load_registry(extra_plugins=(arc_plugin,), load_entry_points=False)
    assert reg.get("task", "arc").config_cls is ArcConfig and reg.get("evaluator", "arc").config_cls is ArcEvalConfig
