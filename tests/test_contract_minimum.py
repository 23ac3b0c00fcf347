"""A plugin written against the documented minimum keeps working (issue 18).

`minimal_dis_plugin` below is what a third-party author wrote from the contract-1.0 docs: a
task, a target generator, an evaluator without `headline` (added in 1.1) and a halting strategy
without `uses_continue_loss`/`continue_loss` (added in 1.1). Loaded with `--plugin` as an
outside package would be, it must be listed by `dis plugins`, pass `dis check`, train, and pass
`dis_core.testing`'s checks; the missing `headline` is a `DisContractWarning` that says what to
add, never a failure. If this file fails, a contract change broke plugin authors: give the new
member a default (dis_core/contract/compat.py, ADDITIONS) instead of editing this plugin.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import warnings

import pytest

import dis_core
import dis_core.contract.slots
from dis_core.contract import compat
from dis_core import testing
from dis_core.tools.cli import main
from dis_core.contract.errors import DisContractWarning
from dis_core.contract.interfaces import BuildContext
from dis_core.wiring.plugins import load_plugin_modules, load_registry
from dis_core.wiring.registry import contract_notes

PLUGIN = textwrap.dedent('''
    """Third-party components written against dis's plugin contract 1.0."""

    import attrs
    import numpy as np
    import torch

    from dis_core import hookimpl
    from dis_core.contract.interfaces import IGNORE, TaskSpec


    @attrs.frozen(kw_only=True)
    class FlipConfig:
        length: int = 6
        num_train: int = 32
        num_test: int = 8


    class FlipSplit:
        def __init__(self, size, length, seed):
            self.size, self.length, self.seed = size, length, seed

        def __len__(self):
            return self.size

        def get(self, indices):
            idx = np.asarray(indices, dtype=np.int64)
            bits = np.array([np.random.default_rng([self.seed, int(i)]).integers(0, 2, self.length) for i in idx])
            bits = bits.reshape(len(idx), self.length)
            return {"inputs": bits + 1, "labels": 2 - bits, "puzzle_ids": np.zeros(len(idx), dtype=np.int64),
                    "example_ids": idx}


    class FlipTask:
        def __init__(self, config):
            self.spec = TaskSpec(vocab_size=3, seq_len=config.length)
            self._splits = {"train": FlipSplit(config.num_train, config.length, 0),
                            "test": FlipSplit(config.num_test, config.length, 1)}

        def dataset(self, split):
            return self._splits[split]


    def build_flip(config: FlipConfig, ctx) -> FlipTask:
        """Flip every bit."""
        return FlipTask(config)


    @attrs.frozen(kw_only=True)
    class NoOptions:
        """No options."""


    class LastOnly:
        monotone = True

        def __call__(self, batch, n_sup, generator):
            y = batch["labels"]
            frames = torch.full((y.shape[0], n_sup, y.shape[1]), IGNORE, dtype=torch.long, device=y.device)
            frames[:, -1] = y
            return frames


    def build_last_only(config: NoOptions, ctx) -> LastOnly:
        """Supervise the last step only."""
        return LastOnly()


    class SolvedRate:  # no `headline`: the 1.0 docs did not ask for one
        def reset(self):
            self.solved, self.count = 0, 0

        def update(self, record):
            final, labels = record.preds[:, -1], record.batch["labels"]
            self.solved += int(((final == labels) | (labels == IGNORE)).all(-1).sum())
            self.count += len(labels)

        def state(self):
            return (self.solved, self.count)

        def compute(self, states, out_dir):
            return {"solved_rate": sum(s for s, _ in states) / max(1, sum(c for _, c in states))}


    def build_solved_rate(config: NoOptions, ctx) -> SolvedRate:
        """Share of test examples solved."""
        ev = SolvedRate()
        ev.reset()
        return ev


    class EveryStep:  # 1.0 halting: no uses_continue_loss, no continue_loss
        uses_q_head = True  # trains the q-head, so the step asks whether to add a Q-continue loss

        def __init__(self, n_sup):
            self.max_steps = n_sup

        def halt(self, steps, q_logits, *, training, generator):
            return steps >= self.max_steps

        def loss(self, q_logits, seq_correct):
            target = seq_correct.to(torch.float32)
            return torch.nn.functional.binary_cross_entropy_with_logits(q_logits[:, 0], target, reduction="none")


    def build_every_step(config: NoOptions, ctx) -> EveryStep:
        """Run every example for n_sup steps."""
        return EveryStep(ctx.n_sup)


    @hookimpl
    def register_tasks(register):
        register("minimal_flip", FlipConfig, build_flip)


    @hookimpl
    def register_target_generators(register):
        register("minimal_last", NoOptions, build_last_only)


    @hookimpl
    def register_evaluators(register):
        register("minimal_solved", NoOptions, build_solved_rate)


    @hookimpl
    def register_halting_strategies(register):
        register("minimal_every_step", NoOptions, build_every_step)
''')

# The builtin backbone at the size of the test suite's tiny recipe (tests/conftest.py).
RECIPE = """
[task]
name = "minimal_flip"
[backbone]
name = "trm"
config = { hidden_size = 32, num_layers = 1, num_heads = 2, expansion = 2.0, step_embedding = true }
[targets]
name = "minimal_last"
[[evaluators]]
name = "minimal_solved"
[supervision]
n_sup = 2
[train]
seed = 0
global_batch_size = 4
steps = 2
log_interval = 1
threads = 1
"""

HEADLINE = r"evaluator 'minimal_solved' of plugin .*\(SolvedRate\) has no `headline`, which plugin contract 1\.1 added and 2\.0 will require"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The plugin as an outside package's module, and a recipe that uses it."""
    root = tmp_path_factory.mktemp("minimal")
    (root / "minimal_dis_plugin.py").write_text(PLUGIN)
    (root / "minimal.toml").write_text(RECIPE)
    yield root
    sys.modules.pop("minimal_dis_plugin", None)  # loaded by file path under its stem


def _args(package, *more: str) -> list[str]:
    return [str(package / "minimal.toml"), "--plugin", str(package / "minimal_dis_plugin.py"),
            "--data-dir", str(package / "data"), *more]


def test_the_contract_version_is_public():
    assert dis_core.CONTRACT_VERSION == compat.CONTRACT_VERSION
    assert compat.version_tuple(dis_core.CONTRACT_VERSION) >= (1, 3)
    assert issubclass(dis_core.DisContractWarning, DeprecationWarning)
    # every deprecated addition names a later major version; the others stay optional
    for row in compat.ADDITIONS:
        assert compat.version_tuple(row.since) <= compat.version_tuple(compat.CONTRACT_VERSION)
        if row.deprecated:
            assert compat.version_tuple(row.required_from)[0] > compat.version_tuple(compat.CONTRACT_VERSION)[0]


def test_dis_plugins_lists_it_and_says_what_to_add(package, capsys):
    with pytest.warns(DisContractWarning, match=HEADLINE) as record:
        assert main(["plugins", "--plugin", str(package / "minimal_dis_plugin.py")]) == 0
    out = capsys.readouterr().out
    for name in ("minimal_flip", "minimal_last", "minimal_solved", "minimal_every_step"):
        assert name in out
    [warning] = [w for w in record if issubclass(w.category, DisContractWarning) and "minimal_dis_plugin" in str(w.message)]
    assert 'add a class attribute `headline = "<metric>"`' in str(warning.message)
    assert warning.filename.endswith("minimal_dis_plugin.py")  # points at the plugin's class, not at dis
    # only the evaluator is outdated: the 1.0 halting strategy's missing members stay optional
    assert "halting" not in str(warning.message)


def test_dis_check_is_clean_with_a_warning(package, capsys):
    with pytest.warns(DisContractWarning, match=HEADLINE):
        code = main(["check", *_args(package)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAIL" not in out
    for kind, name in [("task", "minimal_flip"), ("target_generator", "minimal_last"), ("evaluator", "minimal_solved")]:
        assert re.search(rf"^{kind} +{name} +minimal_dis_plugin +ok\b", out, re.M), out  # checked, and passed


def test_it_trains_two_steps_and_evaluates(package, tmp_path):
    out = tmp_path / "run"
    with pytest.warns(DisContractWarning, match=HEADLINE):
        assert main(["run", *_args(package, "--out", str(out))]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and 0.0 <= summary["minimal_solved/solved_rate"] <= 1.0
    # no headline: run.json names none for it (dis compare then falls back, docs/compare.md)
    assert json.loads((out / "run.json").read_text())["headline_metrics"] == []


def test_a_1_0_halting_strategy_trains(package, tmp_path):
    # It uses the q-head but says nothing of a Q-continue loss: the step must read the default.
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DisContractWarning)  # the evaluator's, checked above
        assert main(["run", *_args(package, "--out", str(out), "--set", "halting.name=minimal_every_step")]) == 0
    assert json.loads((out / "summary.json").read_text())["step"] == 2


def test_the_testing_checks_pass_with_the_warning(package):
    [module] = load_plugin_modules([str(package / "minimal_dis_plugin.py")])
    registry = load_registry(extra_plugins=(module,), load_entry_points=False)

    def build(kind, name):
        entry = registry.get(kind, name)
        return entry.factory(entry.config_cls(), ctx)

    ctx = testing.context(registry=registry)
    task = build("task", "minimal_flip")
    ctx = testing.context(task, n_sup=3, registry=registry)
    testing.check_task(task)
    testing.check_target_generator(build("target_generator", "minimal_last"), task, n_sup=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing outdated here: no warning at all
        testing.check_halting(build("halting", "minimal_every_step"), n_sup=3)
    evaluator = build("evaluator", "minimal_solved")
    with pytest.warns(DisContractWarning, match=r"evaluator SolvedRate has no `headline`"):
        metrics = testing.check_evaluator(evaluator, task, perfect=["solved_rate"])
    assert metrics == {"solved_rate": 1.0}
    assert compat.headline_of(evaluator) is None
    # An author who wants the warning to fail their tests can say so.
    with warnings.catch_warnings(), pytest.raises(DisContractWarning):
        warnings.simplefilter("error", DisContractWarning)
        testing.check_evaluator(build("evaluator", "minimal_solved"), task)


def test_loading_or_building_warns_once_and_the_defaults_apply(package):
    [module] = load_plugin_modules([str(package / "minimal_dis_plugin.py")])

    class Unannotated:  # a factory without a return annotation: only building it can tell
        @dis_core.hookimpl
        def register_evaluators(self, register):
            register("plain_solved", module.NoOptions, lambda config, ctx: module.SolvedRate())

    with pytest.warns(DisContractWarning, match=HEADLINE):  # minimal_solved's annotation says enough
        registry = load_registry(extra_plugins=(module, Unannotated()), load_entry_points=False)
    assert registry.warned == {("evaluator", "minimal_solved")}
    # the same notes, as text, for a listing (`dis plugins --json`)
    [(entry, note)] = contract_notes(registry)
    assert (entry.kind, entry.name) == ("evaluator", "minimal_solved") and "has no `headline`" in note

    def ctx(task=None, component="$.task"):
        return BuildContext(seed=0, n_sup=2, data_dir=package / "data", task=task, registry=registry, component=component)

    task = registry.build("task", "minimal_flip", {}, ctx())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said when loading: not again; the 1.0 halting needs no warning
        ev = ctx(task, "$").build("evaluator", "minimal_solved", at="evaluators[0]")
        halting = ctx(task, "$").build("halting", "minimal_every_step", at="halting")
    with pytest.warns(DisContractWarning, match=r"evaluator 'plain_solved' of plugin .*\(SolvedRate\) has no `headline`"):
        plain = ctx(task, "$").build("evaluator", "plain_solved", at="evaluators[1]")
    assert compat.headline_of(ev) is None and compat.headline_of(plain) is None
    assert compat.uses_continue_loss(halting) is False


def test_every_addition_is_documented_with_its_default_and_version():
    # docs/hooks.md, "Contract versions": one row per ADDITIONS entry, `Protocol.member`, the
    # version that added it, and whether it stays optional or is required from a major version.
    from conftest import ROOT

    text = (ROOT / "docs" / "hooks.md").read_text()
    section = text[text.index("## Contract versions"):text.index("## How plugins are found")]
    assert f"now `{compat.CONTRACT_VERSION}`" in section
    protocols = {slot.kind: slot.interface().__name__ for slot in dis_core.contract.slots.SLOTS}
    for row in compat.ADDITIONS:
        [line] = [ln for ln in section.splitlines() if ln.startswith(f"| `{protocols[row.kind]}.{row.member}` |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == row.since, line
        assert cells[3] == (f"{row.required_from} (deprecated)" if row.deprecated else "stays optional"), line
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(compat.CONTRACT_VERSION)}\b", changelog, re.M)  # the current version's heading
