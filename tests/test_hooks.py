"""Every hook, exercised through inline plugins (the llm pattern): registration lands in the
registry under the hook's kind, recipes structure into the registered config class, factories
get the BuildContext docs/hooks.md promises, factory errors surface as documented, and a
component of each kind the other tests do not train with (halting, evaluator, optimizer,
target generator) works in a tiny training run."""

from __future__ import annotations

import inspect
import pickle
import re
import types
from types import SimpleNamespace

import attrs
import pytest
import torch

from dis_core import hookimpl
from dis_core.wiring.build import build_components
from dis_core.contract.errors import CapabilityError, PluginError, UserError
from dis_core.contract.interfaces import IGNORE, TaskSpec
from dis_core.wiring.plugins import load_registry
from dis_core.wiring.recipe import load_recipe, resolve
from dis_core.wiring.registry import KINDS
from dis_core.loop.trainer import Trainer

from conftest import ROOT, tiny_recipe


@attrs.frozen(kw_only=True)
class ProbeConfig:
    width: int = 1


class _Stub(SimpleNamespace):
    """A stand-in with every method a component Protocol names (build_components checks them)."""

    def __call__(self, *args, **kwargs):
        return None

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class Probe:
    """Implements every hook; each registers a component named `probe` whose factory records
    (kind, config, ctx) and returns a stand-in good enough for `build_components`."""

    def __init__(self, fail: dict | None = None):
        self.calls: list[tuple[str, ProbeConfig, object]] = []
        self.fail = fail or {}  # kind -> exception the factory raises

    def _factory(self, kind, make):
        def factory(config, ctx):
            """Probe component."""
            self.calls.append((kind, config, ctx))
            if kind in self.fail:
                raise self.fail[kind]
            return make(ctx)

        factory.made_by = inspect.currentframe().f_back.f_code.co_name  # the hook method registering it
        return factory

    @hookimpl
    def register_tasks(self, register):
        register("probe", ProbeConfig, self._factory("task", lambda ctx: _Stub(spec=TaskSpec(vocab_size=3, seq_len=4))))

    @hookimpl
    def register_backbones(self, register):
        register("probe", ProbeConfig, self._factory("backbone", lambda ctx: _Stub()))

    @hookimpl
    def register_target_generators(self, register):
        register("probe", ProbeConfig, self._factory("target_generator", lambda ctx: _Stub(monotone=True)))

    @hookimpl
    def register_halting_strategies(self, register):
        register("probe", ProbeConfig, self._factory("halting", lambda ctx: _Stub(max_steps=ctx.n_sup)))

    @hookimpl
    def register_evaluators(self, register):
        register("probe", ProbeConfig, self._factory("evaluator", lambda ctx: _Stub()))

    @hookimpl
    def register_optimizers(self, register):
        register("probe", ProbeConfig, self._factory("optimizer", lambda ctx: (lambda params: None)))

    @hookimpl
    def register_loggers(self, register):
        register("probe", ProbeConfig, self._factory("logger", lambda ctx: _Stub()))


def _probe_recipe(**widths) -> dict:
    def spec(key):
        return {"name": "probe", "config": {"width": widths.get(key, 1)}}

    return {
        "task": spec("task"), "backbone": spec("backbone"), "targets": spec("targets"), "halting": spec("halting"),
        "evaluators": [spec("evaluator")], "supervision": {"n_sup": 4},
        "train": {"seed": 7, "global_batch_size": 2, "steps": 1, "optimizer": spec("optimizer")},
    }


# The hooks and their kinds as docs/hooks.md promises them to plugin authors (a rename breaks
# every plugin): written out here, not read from the slot table the code generates them from.
DOCUMENTED = {
    "register_tasks": "task", "register_backbones": "backbone", "register_target_generators": "target_generator",
    "register_halting_strategies": "halting", "register_evaluators": "evaluator", "register_optimizers": "optimizer",
    "register_loggers": "logger",
}


def test_every_hook_registers_under_its_kind():
    """What a plugin registers through a hook is filed under that hook's documented kind: the
    entry found under each kind is the one the Probe's hook of that kind made, and there is no
    other kind."""
    registry = load_registry(extra_plugins=(Probe(),), load_entry_points=False)
    for hook, kind in DOCUMENTED.items():
        entry = registry.get(kind, "probe")
        assert (entry.kind, entry.config_cls, entry.doc) == (kind, ProbeConfig, "Probe component."), hook
        assert entry.factory.made_by == hook
    assert {e.kind for e in registry.entries()} == set(DOCUMENTED.values())


def test_factories_get_the_documented_build_context(tmp_path):
    probe = Probe()
    registry = load_registry(extra_plugins=(probe,), load_entry_points=False)
    resolved = resolve(_probe_recipe(task=2, backbone=3, targets=4, halting=5, evaluator=6, optimizer=8), registry)
    comp = build_components(resolved, registry, tmp_path)

    kinds = [k for k, _, _ in probe.calls]
    assert kinds == ["task", "backbone", "target_generator", "halting", "evaluator", "optimizer"]
    assert [c.width for _, c, _ in probe.calls] == [2, 3, 4, 5, 6, 8]  # each config structured into ProbeConfig
    task_ctx = probe.calls[0][2]
    assert task_ctx.task is None  # the task is built first; it defines the spec
    with pytest.raises(PluginError, match=r"\$\.task: ctx\.spec is read while the task itself is being built"):
        task_ctx.spec
    for _, _, ctx in probe.calls:
        assert (ctx.seed, ctx.n_sup, ctx.data_dir) == (7, 4, tmp_path)
    for _, _, ctx in probe.calls[1:]:
        assert ctx.task is comp.task and ctx.spec is comp.task.spec
    assert [ctx.component for _, _, ctx in probe.calls] == [
        "$.task", "$.backbone", "$.targets", "$.halting", "$.evaluators[0]", "$.train.optimizer"
    ]
    assert list(comp.evaluators) == ["probe"]


def test_every_build_context_member_is_documented():
    # docs/hooks.md's BuildContext table has a row per field (by the name a factory uses:
    # `spec` for `_spec`) and per method, and no other: a new field is a contract addition.
    import re

    import attrs

    from dis_core.contract.interfaces import BuildContext

    from conftest import ROOT

    text = (ROOT / "docs" / "hooks.md").read_text()
    table = text[text.index("| `BuildContext` member |"):]
    table = table[:table.index("\n\n")].splitlines()[2:]  # past the header and its rule
    rows = {re.match(r"\| `(\w+)", line).group(1) for line in table}
    assert rows == {f.alias for f in attrs.fields(BuildContext)} | {"fail", "build"}
    ctx = BuildContext(seed=0, n_sup=1, data_dir=ROOT)
    assert (ctx.rank, ctx.world_size) == (0, 1)  # a process running alone (contract 1.3)


def test_factory_errors_surface_as_documented(tmp_path):
    data = _probe_recipe()
    failing = Probe(fail={"backbone": ValueError("width must be even")})
    registry = load_registry(extra_plugins=(failing,), load_entry_points=False)
    with pytest.raises(UserError, match=r"mine\.toml: cannot build backbone 'probe' @ \$\.backbone: width must be even"):
        build_components(resolve(data, registry, source="mine.toml"), registry, tmp_path)

    refusing = Probe(fail={"evaluator": CapabilityError("evaluator probe needs a grid")})
    registry = load_registry(extra_plugins=(refusing,), load_entry_points=False)
    with pytest.raises(CapabilityError, match="^evaluator probe needs a grid$"):  # passed through unwrapped
        build_components(resolve(data, registry), registry, tmp_path)


def test_register_checks_its_arguments():
    class BadName:
        @hookimpl
        def register_halting_strategies(self, register):
            register("two words", ProbeConfig, lambda config, ctx: None)

    class NotCallable:
        @hookimpl
        def register_optimizers(self, register):
            register("sgd2", ProbeConfig, "not a factory")

    with pytest.raises(PluginError, match="identifier-like"):
        load_registry(extra_plugins=(BadName(),), load_entry_points=False)
    with pytest.raises(PluginError, match="factory must be callable"):
        load_registry(extra_plugins=(NotCallable(),), load_entry_points=False)


# ------------------------------------------------------------------ a training run


@attrs.frozen(kw_only=True)
class NoOptions:
    """No options."""


@attrs.frozen(kw_only=True)
class SGDConfig:
    lr: float = 0.05


class Components:
    """Inline halting strategy, evaluator, optimizer and target generator that record how the
    trainer drives them."""

    def __init__(self):
        self.halt_calls: list[tuple[bool, list[int]]] = []
        self.target_calls: list[tuple[tuple, int, bool]] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.updates = 0

    @hookimpl
    def register_halting_strategies(self, register):
        rec = self

        class EveryN:
            uses_q_head = False
            uses_continue_loss = False

            def __init__(self, n):
                self.max_steps = n

            def halt(self, steps, q_logits, *, training, generator):
                rec.halt_calls.append((training, steps.tolist()))
                return steps >= self.max_steps

            def loss(self, q_logits, seq_correct):
                return torch.zeros(len(q_logits))

            def continue_loss(self, q_logits, next_q_logits, is_last):
                raise NotImplementedError

        register("every_n", NoOptions, lambda config, ctx: EveryN(ctx.n_sup))

    @hookimpl
    def register_evaluators(self, register):
        rec = self

        class Count:
            headline = "n"

            def reset(self):
                self.n, self.steps = 0, 0

            def update(self, record):
                rec.updates += 1
                assert record.preds.device.type == "cpu" and record.preds.dtype == torch.int64
                self.n += len(record.steps)
                self.steps += int(record.steps.sum())

            def state(self):
                return {"n": self.n, "steps": self.steps}

            def compute(self, states, out_dir):
                n = sum(s["n"] for s in states)
                out_dir.mkdir(parents=True, exist_ok=True)  # created by the evaluator that writes
                (out_dir / "count.txt").write_text(str(n))
                return {"examples": n, "mean_steps": sum(s["steps"] for s in states) / max(n, 1)}

        register("count", NoOptions, lambda config, ctx: Count())

    @hookimpl
    def register_optimizers(self, register):
        def build(config, ctx):
            def make(params):
                opt = torch.optim.SGD(params, lr=config.lr)
                self.optimizers.append(opt)
                return opt

            return make

        register("plain_sgd", SGDConfig, build)

    @hookimpl
    def register_target_generators(self, register):
        rec = self

        class Final:
            monotone = True

            def __call__(self, batch, n_sup, generator):
                rec.target_calls.append((tuple(batch["inputs"].shape), n_sup, isinstance(generator, torch.Generator)))
                return batch["labels"][:, None, :].expand(-1, n_sup, -1).clone()

        register("copy_labels", NoOptions, lambda config, ctx: Final())


def test_inline_components_of_every_kind_train_and_evaluate(tmp_path):
    rec = Components()
    registry = load_registry(extra_plugins=(rec,))  # with the builtin task and backbone
    overrides = ["halting.name=every_n", "evaluators.0.name=count", "evaluators.1.name=exact",
                 "train.optimizer.name=plain_sgd", "targets.name=copy_labels", "train.steps=4"]
    resolved = load_recipe(tiny_recipe(tmp_path), registry, overrides)
    trainer = Trainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data")
    summary = trainer.fit(registry)

    # halting: called after each of the 4 training steps, then in evaluation; n_sup = 3
    train_calls = [steps for training, steps in rec.halt_calls if training]
    assert [s[0] for s in train_calls] == [1, 2, 3, 1]
    assert any(not training for training, _ in rec.halt_calls)
    # evaluator: every test example once, named <evaluator>/<metric>, files under eval/step_N/<name>/
    assert summary["count/examples"] == 12 and summary["count/mean_steps"] == 3
    assert (tmp_path / "run" / "eval" / "step_4" / "count" / "count.txt").read_text() == "12"
    assert not (tmp_path / "run" / "eval" / "step_4" / "exact").exists()  # wrote nothing: no empty folder
    assert "exact/accuracy" in summary and rec.updates >= 1
    pickle.dumps(trainer.solver.evaluators["count"].state())
    # optimizer: made once, on the backbone's trainable parameters, and its lr kept at the base
    (opt,) = rec.optimizers
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in trainer.solver.backbone.parameters() if p.requires_grad)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    # targets: once for the targets report (CPU sample), then at each refill (steps 1 and 4)
    assert [n for _, n, _ in rec.target_calls] == [3, 3, 3] and all(g for _, _, g in rec.target_calls)
    assert [shape for shape, _, _ in rec.target_calls] == [(256, 25), (8, 25), (8, 25)]  # report: 256 of 360 (docs/hooks.md)
    labels = trainer.state.carry.batch["labels"]
    assert (trainer.state.carry.targets[:, -1] == labels).all() and (labels != IGNORE).all()


# ------------------------------------------------------------------ the examples in docs/hooks.md

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def test_hooks_md_examples_are_plugins_that_train_together(tmp_path):
    """Every Python block of docs/hooks.md that holds a @hookimpl is a complete plugin module;
    one per hook, and together they train and evaluate the recipe at the end of the page."""
    text = (ROOT / "docs" / "hooks.md").read_text()
    blocks = FENCE.findall(text)
    modules = []
    for i, (lang, code) in enumerate(blocks):
        if lang == "python" and "@hookimpl" in code:
            mod = types.ModuleType(f"hooks_md_example_{i}")
            exec(compile(code, f"docs/hooks.md block {i}", "exec"), mod.__dict__)
            modules.append(mod)
    implemented = sorted(name for m in modules for name in KINDS if hasattr(m, name))
    assert implemented == sorted(KINDS), "docs/hooks.md needs exactly one example per hook"

    recipe = tmp_path / "examples.toml"
    recipe.write_text([code for lang, code in blocks if lang == "toml" and "[task]" in code][-1])
    registry = load_registry(extra_plugins=tuple(modules), load_entry_points=False)
    resolved = load_recipe(recipe, registry, ["train.steps=3"])
    summary = Trainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data").fit(registry)
    assert summary["step"] == 3 and summary["cost/network_calls"] == 3 * 8 * 3  # steps x slots x (n + 1)
    assert 0.0 <= summary["cells/cell_accuracy"] <= 1.0 and 1 <= summary["cells/mean_steps"] <= 6
