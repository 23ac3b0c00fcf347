"""The kit for plugin authors: boundary checks that name the plugin (dis_core.contract.checks), the
conformance checks of dis_core.testing, `dis check` and `dis show` (dis_core.tools.kit).

A fresh third-party task, `sort` (sort a few digits), is defined inline below with switches that
break it in the ways authors do; the two tutorial packages are installed with pip as in
tests/test_docs.py and must pass `dis check`, `dis show` and their own test files.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

from dis_core import hookimpl, testing
from dis_core.contract.checks import BatchCheck, FramesCheck, Who
from dis_core.step.data import fetch
from dis_core.contract.errors import PluginError
from dis_core.contract.interfaces import IGNORE, TaskSpec
from dis_core.tools.kit import check_recipe, format_rows, render_example, show_examples
from dis_core.wiring.plugins import load_registry
from dis_core.wiring.recipe import load_recipe

from conftest import ROOT, pip_install_target, subprocess_env, tiny_recipe

EXAMPLES = ROOT / "docs" / "examples"

# ------------------------------------------------------------------------------ a fresh task


@attrs.frozen(kw_only=True)
class SortConfig:
    length: int = 6
    num_train: int = 24
    num_test: int = 8
    # How to break it: "" (not), "short" sequences, "vocab" too small, "ids" (example_ids off by
    # one), "labels" (a label outside the vocabulary), "random" (get not pure), "grid" (a wrong grid_shape)
    bug: str = ""


class SortSplit:
    def __init__(self, size: int, config: SortConfig, seed: int):
        self.size, self.config, self.seed = size, config, seed

    def __len__(self):
        return self.size

    def get(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        n, bug = self.config.length, self.config.bug
        seeds = [[self.seed, int(i)] for i in idx] if bug != "random" else [None] * len(idx)
        digits = np.stack([np.random.default_rng(s).integers(1, 10, n) for s in seeds]).reshape(len(idx), n)  # (K, L) tokens 1..9
        labels = np.sort(digits, axis=1)
        if bug == "labels":
            labels[:, 0] = 10
        if bug == "short":
            digits, labels = digits[:, :-1], labels[:, :-1]
        return {"inputs": digits.astype(np.int32), "labels": labels, "puzzle_ids": np.zeros(len(idx), dtype=np.int64),
                "example_ids": idx + 1 if bug == "ids" else idx.copy()}


class SortTask:
    def __init__(self, config: SortConfig):
        vocab = 9 if config.bug == "vocab" else 10  # token 0 is PAD
        grid = (2, 2) if config.bug == "grid" else (2, config.length // 2)
        self.spec = TaskSpec(vocab_size=vocab, seq_len=config.length, grid_shape=grid)
        self._splits = {"train": SortSplit(config.num_train, config, 0), "test": SortSplit(config.num_test, config, 1)}

    def dataset(self, split):
        return self._splits[split]


def build_sort(config: SortConfig, ctx) -> SortTask:
    """Sort a few digits (a test task)."""
    return SortTask(config)


@attrs.frozen(kw_only=True)
class BadConfig:
    bug: str = "count"  # "count" (one frame short), "float", "long" (sequences too long), "token" (out of the vocabulary)


class BadFrames:
    monotone = True

    def __init__(self, bug: str):
        self.bug = bug

    def __call__(self, batch, n_sup, generator):
        y = batch["labels"]
        frames = y[:, None].expand(-1, n_sup, -1).clone()  # (B, N, L)
        if self.bug == "count":
            return frames[:, 1:]
        if self.bug == "float":
            return frames.float()
        if self.bug == "long":
            return torch.cat([frames, frames[:, :, :1]], -1)
        frames[:, 0, 0] = 99
        return frames


class KitPlugin:
    __name__ = "kit_test"  # the plugin's label in messages

    @hookimpl
    def register_tasks(self, register):
        register("sort", SortConfig, build_sort)

    @hookimpl
    def register_target_generators(self, register):
        register("bad_frames", BadConfig, lambda config, ctx: BadFrames(config.bug))


SORT_RECIPE = """
[task]
name = "sort"
config = {{ bug = "{bug}" }}
[backbone]
name = "trm"
config = {{ hidden_size = 16, num_layers = 1, num_heads = 2, expansion = 2.0, step_embedding = true }}
[targets]
name = "{targets}"
[supervision]
n_sup = 3
[[evaluators]]
name = "exact"
[train]
global_batch_size = 4
steps = 2
threads = 1
"""


@pytest.fixture(scope="module")
def kit_registry():
    return load_registry(extra_plugins=(KitPlugin(),))


def sort_recipe(tmp_path: Path, registry, *, bug: str = "", targets: str = "reveal_path", extra: list[str] = ()):
    path = tmp_path / f"sort-{bug or 'ok'}-{targets}.toml"
    path.write_text(SORT_RECIPE.format(bug=bug, targets=targets))
    return load_recipe(path, registry, list(extra))


# ------------------------------------------------------------------------------ boundary checks

SPEC = TaskSpec(vocab_size=10, seq_len=6)
TASK = Who("task", "sort", "kit_test")


def sort_arrays(bug: str, idx=np.arange(4)) -> dict:
    return SortTask(SortConfig(bug=bug)).dataset("train").get(idx)


def batch_error(bug: str, spec: TaskSpec = SPEC) -> str:
    idx = np.arange(4)
    with pytest.raises(PluginError) as err:
        BatchCheck(spec, TASK)(sort_arrays(bug, idx), idx)
    return str(err.value)


def test_a_good_batch_passes_and_is_widened():
    idx = np.array([5, 2, 7])
    BatchCheck(SPEC, TASK)(sort_arrays("", idx), idx)
    batch = fetch(SortTask(SortConfig()).dataset("train"), idx, check=BatchCheck(SPEC, TASK))
    assert batch["inputs"].dtype == torch.int64 and batch["example_ids"].tolist() == [5, 2, 7]


def test_wrong_batches_name_the_task_and_its_plugin():
    assert batch_error("short") == (
        "task 'sort' (plugin 'kit_test') returned inputs of shape (4, 5); expected (4, 6) = (indices asked for, spec.seq_len)")
    assert "example_ids that do not equal the indices asked for (index 0 gave example_id 1)" in batch_error("ids")
    assert "input token 9 " in batch_error("", TaskSpec(vocab_size=9, seq_len=6)) and "spec.vocab_size = 9" in batch_error(
        "", TaskSpec(vocab_size=9, seq_len=6))
    assert "label 10 (example 0, cell 0) outside the vocabulary [0, 10) and not IGNORE" in batch_error("labels")
    idx = np.arange(2)
    arrays = sort_arrays("", idx)
    with pytest.raises(PluginError, match=r"returned puzzle_id 3 \(example 1\) outside \[0, 1\); spec.num_puzzle_ids = 1"):
        BatchCheck(SPEC, TASK)({**arrays, "puzzle_ids": np.array([0, 3])}, idx)
    with pytest.raises(PluginError, match="returned labels of dtype float32; expected integers"):
        BatchCheck(SPEC, TASK)({**arrays, "labels": arrays["labels"].astype(np.float32)}, idx)
    with pytest.raises(PluginError, match="a batch without puzzle_ids"):
        BatchCheck(SPEC, TASK)({k: v for k, v in arrays.items() if k != "puzzle_ids"}, idx)
    with pytest.raises(PluginError, match=r"aux of shape \(3,\) for 2 indices"):
        BatchCheck(SPEC, TASK)({**arrays, "aux": np.zeros(3)}, idx)


def test_fetch_checks_what_needs_no_spec_without_being_asked():
    with pytest.raises(PluginError, match="the dataset's get\\(\\) returned example_ids that do not equal"):
        fetch(SortTask(SortConfig(bug="ids")).dataset("train"), np.arange(3))
    fetch(SortTask(SortConfig(bug="labels")).dataset("train"), np.arange(3))  # the vocabulary needs the spec


@pytest.mark.parametrize("bug, message", [
    ("count", "target generator 'bad_frames' (plugin 'kit_test') returned frames of shape (4, 5, 6); expected (4, 6, 6) "
              "= (batch, supervision.n_sup, task seq_len)"),
    ("long", "returned frames of shape (4, 6, 7); expected (4, 6, 6)"),
    ("float", "returned frames of dtype torch.float32; expected torch.int64 token ids (token ids: round, then .long())"),
    ("token", "returned token 99 at step 1 (batch row 0, cell 0) outside the task's vocabulary [0, 10) and not IGNORE (-100)"),
])
def test_wrong_frames_name_the_generator_and_its_plugin(bug, message):
    batch = fetch(SortTask(SortConfig()).dataset("train"), np.arange(4))
    check = FramesCheck(SPEC, 6, Who("target_generator", "bad_frames", "kit_test"))
    with pytest.raises(PluginError) as err:
        check(BadFrames(bug)(batch, 6, torch.Generator()), batch)
    assert message in str(err.value)
    good = batch["labels"][:, None].expand(-1, 6, -1).clone()
    good[:, 0, 1] = IGNORE
    assert check(good, batch) is good


def test_the_trainer_checks_batches_and_frames_where_they_enter(tmp_path, kit_registry):
    from dis_core.loop.trainer import Trainer

    resolved = sort_recipe(tmp_path, kit_registry, targets="bad_frames")
    trainer = Trainer(resolved, kit_registry, tmp_path / "run", data_dir=tmp_path / "data")
    with pytest.raises(PluginError, match=r"target generator 'bad_frames' \(plugin 'kit_test'\) returned frames of shape \(4, 2, 6\)"):
        trainer.train_step()
    resolved = sort_recipe(tmp_path, kit_registry, bug="vocab")
    trainer = Trainer(resolved, kit_registry, tmp_path / "run2", data_dir=tmp_path / "data")
    with pytest.raises(PluginError, match=r"task 'sort' \(plugin 'kit_test'\) returned input token 9 .* spec.vocab_size = 9"):
        trainer.train_step()


# ------------------------------------------------------------------------------ dis_core.testing


def test_a_fresh_task_passes_the_conformance_checks():
    testing.check_task(lambda: SortTask(SortConfig()))
    task = SortTask(SortConfig())
    entry = load_registry().get("target_generator", "reveal_path")
    testing.check_target_generator(entry.factory(entry.config_cls(), testing.context(task)), task)


@pytest.mark.parametrize("bug, message", [
    ("short", "returned inputs of shape (8, 5); expected (8, 6)"),
    ("random", "get() is not a pure function of the indices"),
    ("grid", "spec.grid_shape (2, 2) covers 4 cells, spec.seq_len is 6"),
    ("vocab", "outside the vocabulary [0, 9)"),
])
def test_check_task_names_what_is_broken(bug, message):
    with pytest.raises(AssertionError) as err:
        testing.check_task(SortTask(SortConfig(bug=bug)))
    assert message in str(err.value)


class Drifting:
    """A generator that declares monotone paths, draws from the global RNG and ends off y*."""

    monotone = True

    def __init__(self, bug: str):
        self.bug = bug

    def __call__(self, batch, n_sup, generator):
        x, y = batch["inputs"], batch["labels"]
        if self.bug == "global":
            torch.rand(1)
        frames = [x] * (n_sup - 1) + [y]
        if self.bug == "away" and n_sup > 2:
            frames[1] = (y + 1) % 10  # further from y* than the question
        if self.bug == "final":
            frames[-1] = x
        return torch.stack(frames, 1)


@pytest.mark.parametrize("bug, message", [
    ("global", "drew from torch's global RNG"),
    ("away", "declares monotone, but at n_sup = 4 the distance to y* grows"),
    ("final", "the last frame differs from the labels"),
])
def test_check_target_generator_names_what_is_broken(bug, message):
    task = SortTask(SortConfig())
    testing.check_target_generator(Drifting(""), task)
    with pytest.raises(AssertionError, match=re.escape(message)):
        testing.check_target_generator(Drifting(bug), task)


class NeverHalts:
    max_steps, uses_q_head, uses_continue_loss = 3, False, False

    def halt(self, steps, q_logits, *, training, generator):
        return torch.zeros(len(steps), dtype=torch.bool)

    def loss(self, q_logits, seq_correct):
        return torch.zeros(len(q_logits))

    def continue_loss(self, q_logits, next_q_logits, is_last):
        return torch.zeros(len(q_logits))


def test_check_halting_wants_a_halt_at_max_steps():
    with pytest.raises(AssertionError, match="let a slot run past max_steps = 3"):
        testing.check_halting(NeverHalts())

    class Halts(NeverHalts):
        def halt(self, steps, q_logits, *, training, generator):
            return steps >= self.max_steps

    testing.check_halting(Halts(), n_sup=3)
    with pytest.raises(AssertionError, match="max_steps = 3 > n_sup = 2"):
        testing.check_halting(Halts(), n_sup=2)


class MeanOfMeans:
    """Averages per-rank accuracies: merging two ranks differs from one pass."""

    headline = "accuracy"

    def reset(self):
        self.acc = None

    def update(self, record):
        self.acc = float((record.preds[:, -1] == record.batch["labels"]).all(-1).float().mean())

    def state(self):
        return {"acc": self.acc}

    def compute(self, states, out_dir):
        return {"accuracy": sum(s["acc"] for s in states) / len(states)}


def test_check_evaluator_wants_states_that_merge_and_pickle():
    task = SortTask(SortConfig(num_test=7))
    with pytest.raises(AssertionError, match="the states of two ranks merged give"):
        testing.check_evaluator(MeanOfMeans(), task, perfect=["accuracy"])

    class Unpicklable(MeanOfMeans):
        def state(self):
            return {"acc": self.acc, "fn": lambda: None}

    with pytest.raises(AssertionError, match="state\\(\\) is not picklable"):
        testing.check_evaluator(Unpicklable(), task)


def test_check_backbone_names_a_wrong_output():
    entry = load_registry().get("backbone", "trm")
    spec = TaskSpec(vocab_size=5, seq_len=6)
    cfg = entry.config_cls(hidden_size=16, num_layers=1, num_heads=2, expansion=2.0)
    net = entry.factory(cfg, testing.context(spec=spec, n_sup=3))
    testing.check_backbone(net, spec, n_sup=3)
    with pytest.raises(AssertionError, match=r"forward raised IndexError: .* tokens \(3, 6\) in \[0, 7\)"):
        testing.check_backbone(net, TaskSpec(vocab_size=7, seq_len=6), n_sup=3)  # its embedding has 5 rows
    forward = net.forward
    net.forward = lambda *args: (lambda s, logits, q: (s, logits[:, 1:], q))(*forward(*args))
    with pytest.raises(AssertionError, match=r"the backbone returned logits of shape \(3, 5, 5\) .* expected floating \(3, 6, 5\)"):
        testing.check_backbone(net, spec, n_sup=3)


# ------------------------------------------------------------------------------ dis check, dis show


def test_dis_check_passes_a_fresh_task(tmp_path, kit_registry):
    rows = check_recipe(sort_recipe(tmp_path, kit_registry), kit_registry, data_dir=tmp_path / "data")
    text = format_rows(rows)
    assert all(r.ok for r in rows), text
    kinds = [(r.kind, r.name) for r in rows]
    assert kinds == [("task", "sort"), ("target_generator", "reveal_path"), ("backbone", "trm"), ("halting", "fixed"),
                     ("optimizer", "adamw"), ("step", "training"), ("step", "evaluation"), ("evaluator", "exact")]
    assert rows[0].plugin == "kit_test" and rows[2].plugin == "trm"
    assert text.splitlines()[-1] == "all 8 checks passed"


def test_dis_check_names_the_broken_component(tmp_path, kit_registry):
    rows = check_recipe(sort_recipe(tmp_path, kit_registry, targets="bad_frames"), kit_registry, data_dir=tmp_path / "data")
    failed = {(r.kind, r.name): r.problem for r in rows if not r.ok}
    assert set(failed) == {("target_generator", "bad_frames"), ("step", "training")}, format_rows(rows)
    assert "target generator 'bad_frames' (plugin 'kit_test') returned frames of shape (4, 2, 6)" in failed[("target_generator", "bad_frames")]
    assert failed[("step", "training")].startswith("skipped: needs target generator")
    assert "FAIL" in format_rows(rows) and "6 of 8 checks passed" in format_rows(rows)

    rows = check_recipe(sort_recipe(tmp_path, kit_registry, bug="short"), kit_registry, data_dir=tmp_path / "data")
    assert "task 'sort' (plugin 'kit_test') returned inputs of shape (4, 5); expected (4, 6)" in rows[0].problem

    unbuildable = tmp_path / "unbuildable.toml"  # the nqueens evaluator refuses a task without square grids
    unbuildable.write_text(SORT_RECIPE.format(bug="", targets="final").replace('name = "exact"', 'name = "nqueens"'))
    rows = check_recipe(load_recipe(unbuildable, kit_registry), kit_registry, data_dir=tmp_path / "data")
    assert [(r.kind, r.ok) for r in rows] == [("build", False)] and "square grid_shape" in rows[0].problem


def test_dis_show_marks_the_cells_each_frame_changes(tmp_path, kit_registry):
    text = show_examples(sort_recipe(tmp_path, kit_registry), kit_registry, data_dir=tmp_path / "data", examples=2)
    assert "2 train examples with the most cells to change, among up to 512 drawn at random (seed 0); the target path of " \
           "target generator 'reveal_path' (plugin 'targets')" in text
    assert text.count("example_id ") == 2 and "(monotone)" in text
    assert "step 1" in text and "step 3" in text and "y*" in text
    x = np.array([1, 2, 3, 4])
    frames = np.array([[1, 2, 3, 4], [1, 9, 3, 4], [1, 9, 3, 5]])
    y = np.array([1, 9, IGNORE, 5])
    lines = render_example(x, frames, y, (2, 2))
    assert lines == [
        "x      step 1   step 2   step 3   y*",
        "1 2    1 2      1 9*     1 9      1 9",
        "3 4    3 4      3 4      3 5*     .*5",
    ]
    assert render_example(x, frames[:1], y, None) == ["x       1 2 3 4", "step 1  1 2 3 4", "y*      1 9*.*5*"]


def test_dis_check_and_show_on_the_tutorial_packages(tmp_path):
    """Both tutorial packages pass `dis check` on their recipe, `dis show` prints their paths,
    and their own tests (dis_core.testing) pass."""
    site = tmp_path / "site"
    for pkg in ("dis-task-parity", "dis-row-sweep"):
        pip_install_target(EXAMPLES / pkg, site)
    env = subprocess_env(PYTHONPATH=str(site))

    def dis(*args):
        return subprocess.run([sys.executable, "-m", "dis_core.tools.cli", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)

    parity = str(EXAMPLES / "dis-task-parity" / "parity_quick.toml")
    checked = dis("check", parity, "--set", "train.threads=1")
    assert checked.returncode == 0, checked.stdout + checked.stderr[-2000:]
    assert re.search(r"^task +parity +parity +ok ", checked.stdout, re.M) and re.search(r"^evaluator +parity +parity +ok ", checked.stdout, re.M)
    assert checked.stdout.strip().endswith("all 9 checks passed")

    recipe = tiny_recipe(tmp_path, targets="row_sweep")
    checked = dis("check", str(recipe), "--set", "targets.config.direction=backward")
    assert checked.returncode == 0, checked.stdout + checked.stderr[-2000:]
    assert re.search(r"^target_generator +row_sweep +row_sweep +ok ", checked.stdout, re.M), checked.stdout

    shown = dis("show", str(recipe), "--examples", "2")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "the target path of target generator 'row_sweep' (plugin 'row_sweep')" in shown.stdout and "*" in shown.stdout

    tests = [str(EXAMPLES / pkg / f"test_{pkg.replace('-', '_')}.py") for pkg in ("dis-task-parity", "dis-row-sweep")]
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert ran.returncode == 0 and "4 passed" in ran.stdout, ran.stdout[-2000:]
