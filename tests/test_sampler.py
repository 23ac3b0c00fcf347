"""Training streams: the per-example shuffle and the reference's group order (`train.sampler`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dis_core.step.data import ExampleStream, GroupStream, make_stream
from dis_core.contract.errors import PluginError, UserError
from dis_core.contract.interfaces import PuzzleGroups, Stream
from dis_core.wiring.recipe import load_recipe
from dis_core.loop.trainer import Trainer
from dis_plugins.tasks.arc.reference_layout import export_reference_layout
from dis_plugins.tasks.arc.task import ArcConfig, ArcTask

# Three groups of unequal members, so passes differ in length: group 0 = puzzles {0,1,2} and
# {3,4}; group 1 = {5}, {6,7,8,9} and {10,11}; group 2 = {12,13,14}. Index 15 is in no puzzle.
TOY = PuzzleGroups(puzzle_start=[0, 3, 5, 6, 10, 12], puzzle_size=[3, 2, 1, 4, 2, 3], group_offsets=[0, 2, 5, 6])
TOY_SIZE = 16
PUZZLE_OF = np.repeat(np.arange(6), TOY.puzzle_size)  # puzzle of each index 0..14
GROUP_OF_PUZZLE = np.array([0, 0, 1, 1, 1, 2])


def _stream(global_batch=4, rank=0, world=1, seed=0, groups=TOY, size=TOY_SIZE) -> GroupStream:
    return GroupStream(groups, size, global_batch, rank, world, seed)


def _passes(stream: GroupStream, n: int) -> list[np.ndarray]:
    """The first n passes of a one-rank stream, cut at the pass boundaries."""
    seq = stream.take(200)
    ends = stream.ends if stream.pass_len is None else np.arange(n + 1) * stream.pass_len
    assert ends[n] <= len(seq)
    return [seq[ends[p]:ends[p + 1]] for p in range(n)]


def test_both_orders_are_streams_that_resume_where_they_stopped():
    for make in (lambda: ExampleStream(TOY_SIZE, 4, 0, 1, 0), _stream):
        stream = make()
        assert isinstance(stream, Stream)
        first = stream.take(6)
        state = stream.state_dict()
        again = make()
        again.load_state_dict(state)
        assert np.array_equal(again.take(5), stream.take(5)) and len(first) == 6
        assert again.epochs_done() == stream.epochs_done() == 11 / TOY_SIZE


def test_group_stream_is_deterministic_and_resumable():
    whole = _stream().take(60)
    pieces = _stream()
    assert np.array_equal(np.concatenate([pieces.take(k) for k in (1, 7, 0, 13, 39)]), whole)
    assert np.array_equal(_stream().take(60), whole)
    assert not np.array_equal(_stream(seed=1).take(60), whole)
    head = _stream()
    head.take(23)
    resumed = _stream()
    resumed.load_state_dict(head.state_dict())
    assert np.array_equal(resumed.take(37), whole[23:])


@pytest.mark.parametrize("groups, size", [(TOY, TOY_SIZE), (PuzzleGroups(puzzle_start=[0, 3, 6, 8], puzzle_size=[3, 3, 2, 2], group_offsets=[0, 2, 4]), 10)])
def test_two_ranks_interleave_to_one_rank(groups, size):
    one = _stream(8, groups=groups, size=size).take(80)
    r0, r1 = (_stream(8, rank=r, world=2, groups=groups, size=size) for r in (0, 1))
    a = np.concatenate([r0.take(k) for k in (3, 17, 20)])  # ranks take in different pieces
    b = np.concatenate([r1.take(k) for k in (20, 20)])
    assert np.array_equal(np.stack([a.reshape(10, 4), b.reshape(10, 4)], 1).reshape(-1), one)
    assert r0.epochs_done() == r1.epochs_done() == 80 / size


def test_each_pass_shows_every_group_once_with_one_puzzle_contiguous():
    stream = _stream()
    assert stream.pass_len is None  # members differ in size
    seen_members = set()
    for seq in _passes(stream, 12):
        runs = np.split(seq, np.flatnonzero(np.diff(PUZZLE_OF[seq])) + 1)
        puzzles = [int(PUZZLE_OF[run[0]]) for run in runs]
        assert sorted(GROUP_OF_PUZZLE[puzzles].tolist()) == [0, 1, 2]  # every group, one puzzle each
        for run, p in zip(runs, puzzles):  # all of the puzzle's examples, once, together
            assert sorted(run.tolist()) == list(range(TOY.puzzle_start[p], TOY.puzzle_start[p] + TOY.puzzle_size[p]))
        seen_members.update(puzzles)
    assert seen_members == set(range(6))  # every member gets drawn
    assert 15 not in np.concatenate(_passes(_stream(), 12))


def test_equal_members_give_fixed_pass_length():
    groups = PuzzleGroups(puzzle_start=[0, 2, 4, 7], puzzle_size=[2, 2, 3, 3], group_offsets=[0, 2, 4])
    stream = _stream(groups=groups, size=10)
    assert stream.pass_len == 5
    for seq in _passes(stream, 6):
        assert len(seq) == 5 and len({int(i) // 2 if i < 4 else 2 + (int(i) - 4) // 3 for i in seq}) == 2


def test_resume_refuses_another_sampler():
    ex = ExampleStream(TOY_SIZE, 4, 0, 1, 0)
    with pytest.raises(UserError, match="train.sampler = 'examples'"):
        _stream().load_state_dict(ex.state_dict())
    with pytest.raises(UserError, match="train.sampler = 'groups'"):
        ex.load_state_dict(_stream().state_dict())
    ex.load_state_dict({"taken": 5})  # a checkpoint from before train.sampler: the example order
    assert np.array_equal(ex.take(7), ExampleStream(TOY_SIZE, 4, 0, 1, 0).take(12)[5:])  # it goes on after 5


class _Plain:
    def __len__(self):
        return TOY_SIZE

    def get(self, indices):
        return {}


class _Grouped(_Plain):
    def __init__(self, groups):
        self._groups = groups

    def groups(self):
        return self._groups


def test_make_stream_picks_the_sampler_and_names_the_task():
    assert make_stream(_Plain(), "auto", 4, 0, 1, 0, "toy").sampler == "examples"
    assert make_stream(_Grouped(TOY), "auto", 4, 0, 1, 0, "toy").sampler == "groups"
    assert make_stream(_Grouped(TOY), "examples", 4, 0, 1, 0, "toy").sampler == "examples"
    assert make_stream(_Grouped(None), "auto", 4, 0, 1, 0, "toy").sampler == "examples"
    with pytest.raises(UserError, match="task 'toy' declares no puzzle groups"):
        make_stream(_Plain(), "groups", 4, 0, 1, 0, "toy")
    bad = PuzzleGroups(puzzle_start=[0, 14], puzzle_size=[3, 3], group_offsets=[0, 2])
    with pytest.raises(PluginError, match="task 'toy'.*outside the split"):
        make_stream(_Grouped(bad), "auto", 4, 0, 1, 0, "toy")
    empty_group = PuzzleGroups(puzzle_start=[0], puzzle_size=[3], group_offsets=[0, 0, 1])
    with pytest.raises(PluginError, match="group_offsets"):
        make_stream(_Grouped(empty_group), "groups", 4, 0, 1, 0, "toy")


# ------------------------------------------------------------------------------ ARC


def _write_tasks(folder, names, seed, n_train, n_test):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def grid():
        h, w = rng.integers(1, 6, 2)
        return rng.integers(0, 5, (h, w)).tolist()

    for name in names:
        task = {kind: [{"input": grid(), "output": grid()} for _ in range(n)] for kind, n in (("train", n_train), ("test", n_test))}
        (folder / f"{name}.json").write_text(json.dumps(task))
    return str(folder)


@pytest.fixture
def arc_dirs(tmp_path):
    train = _write_tasks(tmp_path / "tr", [f"t{i}" for i in range(6)], seed=1, n_train=3, n_test=1)
    test = _write_tasks(tmp_path / "te", ["e1", "e2"], seed=2, n_train=2, n_test=1)
    return train, test


def _arc(arc_dirs, **kw) -> ArcTask:
    return ArcTask(ArcConfig(train_subsets=(arc_dirs[0],), test_subset=arc_dirs[1], num_augmentations=kw.pop("num_augmentations", 40), **kw))


def test_arc_batches_hold_whole_puzzles_one_variant_per_group(arc_dirs):
    task = _arc(arc_dirs)
    train = task.dataset("train")
    stream = make_stream(train, "auto", 64, 0, 1, 0, "arc")
    assert stream.sampler == "groups" and stream.pass_len == 6 * 4 + 2 * 2
    batch = train.get(stream.take(64))
    ids = batch["puzzle_ids"]
    shuffled = train.get(make_stream(train, "examples", 64, 0, 1, 0, "arc").take(64))["puzzle_ids"]
    assert len(np.unique(ids)) <= 64 // 2 < len(np.unique(shuffled))  # ~3 examples per id against ~1
    # Pass by pass: each group (original task) once, as one run of its E_g examples of one variant.
    var_offset = task.corpus.var_offset
    for p in range(2):
        seq = ids[p * stream.pass_len:(p + 1) * stream.pass_len]
        runs = np.split(seq, np.flatnonzero(np.diff(seq)) + 1)
        tasks = [int(np.searchsorted(var_offset, run[0] - 1, side="right") - 1) for run in runs]
        assert sorted(tasks) == list(range(8))
        assert all(len(run) == (4 if t < 6 else 2) for run, t in zip(runs, tasks))
    assert len(np.unique(batch["example_ids"][: stream.pass_len])) == stream.pass_len


def test_reference_layout_streams_like_the_native_split(arc_dirs, tmp_path):
    native = _arc(arc_dirs, num_augmentations=4)
    export_reference_layout(native, tmp_path / "ref", progress=False)
    back = ArcTask(ArcConfig(reference_dir=str(tmp_path / "ref")))
    a, b = (make_stream(t.dataset("train"), "groups", 16, 0, 1, 3, "arc").take(80) for t in (native, back))
    assert np.array_equal(a, b)
    assert back.dataset("test").groups() is None


ARC_RECIPE = """
[task]
name = "arc"
config = {{ train_subsets = ["{train}"], test_subset = "{test}", num_augmentations = 3, eval_variants = 1 }}
[backbone]
name = "trm"
config = {{ hidden_size = 16, num_layers = 1, num_heads = 2, expansion = 2.0, puzzle_emb_ndim = 16, puzzle_emb_len = 1 }}
[supervision]
n_sup = 1
[[evaluators]]
name = "arc"
[train]
global_batch_size = 4
steps = 1
threads = 1
"""


def test_tiny_arc_run_uses_the_group_sampler_by_default(arc_dirs, tmp_path, registry):
    recipe = tmp_path / "arc.toml"
    recipe.write_text(ARC_RECIPE.format(train=arc_dirs[0], test=arc_dirs[1]))
    trainer = Trainer(load_recipe(recipe, registry, []), registry, tmp_path / "run", data_dir=tmp_path / "data")
    assert isinstance(trainer.state.stream, GroupStream)
    trainer.fit(registry)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["sampler"] == "groups" and info["recipe"]["train"]["sampler"] == "auto"
