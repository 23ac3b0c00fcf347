"""The slot table (dis_core/contract/slots.py) drives hookspecs, registry, recipes, building and `dis plugins`;
factories build through `ctx.build` and report through `ctx.fail`; one path rule for recipes;
`--plugin` modules; installed plugin modules without @hookimpl."""

from __future__ import annotations

import copy
import json
import os
import re
import textwrap
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol, runtime_checkable

import attrs
import pytest
import tomllib
from structlog.testing import capture_logs

from dis_core import hookimpl
from dis_core.wiring.build import build_components
from dis_core.tools.cli import main, plugin_rows
from dis_core.contract.errors import PluginError, RecipeError, UserError
from dis_core.contract.interfaces import BuildContext, TaskSpec
from dis_core.wiring.plugins import load_plugin_modules, load_registry, make_plugin_manager
from dis_core.wiring.recipe import load_recipe, resolve
from dis_core.contract.slots import SLOTS, Slot, parts, value_at

from conftest import ROOT, tiny_recipe


# ------------------------------------------------------------------ the table is the one place


def _table(text: str, header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with `header`, as cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:  # past the header and its rule
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _headings(text: str, level: int) -> set[str]:
    """The text of every heading of exactly `level` #s outside fenced code."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return {m.group(1).strip() for m in re.finditer(rf"^{'#' * level} (.*)$", prose, re.M)}


def _section_path(section: str) -> tuple[str, bool]:
    """`[train.optimizer]` -> ("train.optimizer", one); `[[evaluators]]` -> ("evaluators", many)."""
    many = section.startswith("`[[")
    return section.strip("`[]"), many


class _Stub(SimpleNamespace):
    """A stand-in with every method a component Protocol names (building checks them)."""

    def __call__(self, *args, **kwargs):
        return None

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def _hook_table() -> list[tuple[str, str, str]]:
    """(hook, registry kind, recipe section) of each row of the table atop docs/hooks.md."""
    rows = _table((ROOT / "docs" / "hooks.md").read_text(), "| Hook | Registry kind | Recipe section |")
    return [(hook.strip("`"), kind.strip("`"), section) for hook, kind, section, *_ in rows]


def test_each_documented_hook_registers_its_kind_and_is_built_from_its_section(tmp_path):
    """docs/hooks.md's table is what a plugin author relies on: a plugin implementing the hook a
    row names is called, its component is registered under the row's kind, and a recipe naming
    it in the row's section builds it (the task first: every later factory sees it)."""
    rows = _hook_table()
    offered = {name for name in vars(make_plugin_manager(load_entry_points=False).hook) if name.startswith("register_")}
    assert {hook for hook, _, _ in rows} == offered  # every hook a plugin can implement, and no other

    made, seen_task = {}, {}

    def hook_impl(hook, kind):
        def factory(config, ctx):
            seen_task[kind] = ctx.task
            made[kind] = _Stub(spec=TaskSpec(vocab_size=3, seq_len=4), monotone=True, max_steps=ctx.n_sup, headline="n")
            return made[kind]

        def impl(register):
            register("row_probe", FlipConfig, factory)

        impl.__name__ = hook
        return hookimpl(impl), factory

    plugin = types.ModuleType("row_probe_plugin")
    factories = {}
    for hook, kind, _ in rows:
        impl, factories[kind] = hook_impl(hook, kind)
        setattr(plugin, hook, impl)
    registry = load_registry(extra_plugins=(plugin,), load_entry_points=False)
    for hook, kind, _ in rows:
        assert registry.get(kind, "row_probe").factory is factories[kind], hook

    data = {"supervision": {"n_sup": 2}, "train": {"global_batch_size": 2, "steps": 1}}
    for _, _, section in rows:
        key, many = _section_path(section)
        *parents, last = key.split(".")
        table = data
        for part in parents:
            table = table.setdefault(part, {})
        table[last] = [{"name": "row_probe"}] if many else {"name": "row_probe"}
    comp = build_components(resolve(data, registry), registry, tmp_path)
    for _, kind, section in rows:
        key, many = _section_path(section)
        assert comp.by_path[f"{key}[0]" if many else key] is made[kind], section
        if kind != "task":
            assert seen_task[kind] is made["task"], kind


def test_the_recipes_docs_say_what_an_absent_section_becomes(tmp_path, registry):
    """docs/recipes.md, "Component sections": one row per section of docs/hooks.md's table, each
    with a section of its own, and what a recipe that leaves the section out gets."""
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    rows = {section: (kind, absent) for section, kind, absent in _table(recipes, "| Section | Kind | When absent |")}
    assert {section: kind for section, (kind, _) in rows.items()} == {section: kind for _, kind, section in _hook_table()}
    assert set(rows) <= _headings(recipes, 2), "docs/recipes.md needs a '## <section>' per component section"

    full = tomllib.loads(tiny_recipe(tmp_path).read_text())
    for section, (kind, absent) in rows.items():
        key, many = _section_path(section)
        *parents, last = key.split(".")
        data = copy.deepcopy(full)
        table = data
        for part in parents:
            table = table[part]
        table.pop(last, None)
        if absent.startswith("required"):
            with pytest.raises(RecipeError, match=rf"required field missing @ \$\.{re.escape(key)}\b"):
                resolve(data, registry)
            continue
        resolved = resolve(data, registry)
        names = [spec.name for spec in value_at(resolved.recipe, key)] if many else [value_at(resolved.recipe, key).name]
        documented = re.findall(r"`(\w+)`", absent.split("(")[0])  # names before any explanation
        assert names == documented, f"{section}: docs say {absent!r}, a recipe without it gets {names}"


def test_component_paths_split_into_keys_and_indices():
    assert parts("evaluators[1].config.x") == ("evaluators", 1, "config", "x")
    assert parts("train.optimizer") == ("train", "optimizer")


@runtime_checkable
class Augmenter(Protocol):
    """A new kind of component, for the test: rewrites a batch before the step."""

    def augment(self, batch: dict) -> dict: ...


@attrs.frozen(kw_only=True)
class FlipConfig:
    p: float = 0.5


class Flip:
    def __init__(self, p, spec):
        self.p, self.spec = p, spec

    def augment(self, batch):
        return batch


class AugPlugin:
    @hookimpl
    def register_augmenters(self, register):
        register("flip", FlipConfig, lambda config, ctx: Flip(config.p, ctx.spec))
        register("broken", FlipConfig, lambda config, ctx: object())


AUG = Slot(key="augment", kind="augmenter", hook="register_augmenters", protocol=Augmenter,
           doc="Register batch augmenters. Factory returns an `Augmenter`.", default="flip")


def test_a_new_kind_is_one_row(tmp_path):
    slots = (*SLOTS, AUG)
    registry = load_registry(extra_plugins=(AugPlugin(),), slots=slots)  # a fresh plugin manager with the row's hook
    assert registry.get("augmenter", "flip").plugin  # registered
    assert [e.kind for e in registry.entries()][-1] == "augmenter"  # listed after the builtin kinds
    rows = plugin_rows(registry)
    assert {"kind": "augmenter", "name": "flip", "recipe_key": "augment"}.items() <= next(r for r in rows if r["name"] == "flip").items()

    recipe = tiny_recipe(tmp_path, extra='\n[augment]\nname = "flip"\nconfig = { p = 0.25 }\n')
    resolved = load_recipe(recipe, registry)
    assert resolved.component("augment")[1] == FlipConfig(p=0.25)
    assert resolved.to_dict()["augment"] == {"name": "flip", "config": {"p": 0.25}}
    comp = build_components(resolved, registry, tmp_path / "data")
    assert isinstance(comp.augment, Flip) and comp.augment.p == 0.25 and comp.augment.spec == comp.task.spec

    default = load_recipe(tiny_recipe(tmp_path, name="plain.toml"), registry)  # the row's default
    assert default.component("augment") == ("flip", FlipConfig())
    with pytest.raises(RecipeError, match=r"extra fields found \(q\) @ \$\.augment\.config"):
        load_recipe(recipe, registry, ["augment.config.q=1"])
    with pytest.raises(PluginError, match=r"augmenter 'broken' @ \$\.augment returned .*missing: augment"):
        build_components(load_recipe(recipe, registry, ["augment.name=broken"]), registry, tmp_path / "data")
    # the builtin table knows no such key
    with pytest.raises(RecipeError, match=r"extra fields found \(augment\)"):
        load_recipe(recipe, load_registry())


def test_a_new_kind_in_a_nested_table(tmp_path):
    slots = (*SLOTS, attrs.evolve(AUG, key="supervision.augment", default=None, many=True))
    registry = load_registry(extra_plugins=(AugPlugin(),), slots=slots)
    recipe = tiny_recipe(tmp_path, extra='\n[[supervision.augment]]\nname = "flip"\n')
    resolved = load_recipe(recipe, registry)
    assert resolved.recipe.supervision.n_sup == 3 and resolved.component("supervision.augment[0]")[0] == "flip"
    assert resolved.to_dict()["supervision"]["augment"] == [{"name": "flip", "config": {"p": 0.5}}]
    assert list(build_components(resolved, registry, tmp_path / "data").augment) == ["flip"]


# ------------------------------------------------------------------ one path spelling


def test_evaluator_paths_are_spelled_one_way(tmp_path):
    class Failing:
        @hookimpl
        def register_evaluators(self, register):
            def build(config, ctx):
                raise ValueError("no grid")

            register("failing", FlipConfig, build)

    registry = load_registry(extra_plugins=(Failing(),))
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(RecipeError, match=r"@ \$\.evaluators\[1\]\.config"):
        load_recipe(recipe, registry, ["evaluators.1.config.x=1"])
    with pytest.raises(UserError, match=r"cannot build evaluator 'failing' @ \$\.evaluators\[1\]: no grid"):
        build_components(load_recipe(recipe, registry, ["evaluators.1.name=failing"]), registry, tmp_path / "data")


# ------------------------------------------------------------------ ctx.build, ctx.fail, ctx.spec


@attrs.frozen(kw_only=True)
class WrapConfig:
    inner: str = "final"
    inner_config: dict = attrs.field(factory=dict)
    limit: int = 3


class Wrapper:
    monotone = True

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, batch, n_sup, generator):
        return self.inner(batch, n_sup, generator)


class WrapPlugin:
    @hookimpl
    def register_target_generators(self, register):
        def build(config, ctx):
            if config.limit < 0:
                ctx.fail(f"limit must be >= 0, got {config.limit}", at="config.limit")
            return Wrapper(ctx.build("target_generator", config.inner, config.inner_config,
                                     at="config.inner", config_at="config.inner_config"))

        register("wrap", WrapConfig, build)


def test_ctx_build_and_fail(tmp_path):
    registry = load_registry(extra_plugins=(WrapPlugin(),))
    recipe = tiny_recipe(tmp_path)

    def build(*overrides):
        return build_components(load_recipe(recipe, registry, ["targets.name=wrap", *overrides]), registry, tmp_path / "data")

    comp = build("targets.config.inner=mask", "targets.config.inner_config.keep_clues=true")
    assert type(comp.targets.inner).__name__ == "MaskTargets" and comp.targets.inner.keep_clues
    with pytest.raises(UserError, match=rf"^{recipe} @ \$\.targets\.config\.limit: limit must be >= 0, got -1$"):
        build("targets.config.limit=-1")
    with pytest.raises(UserError, match=r"tiny\.toml @ \$\.targets\.config\.inner: unknown target_generator 'nope'; .*reveal_path"):
        build("targets.config.inner=nope")
    with pytest.raises(RecipeError, match=r"extra fields found \(x\) @ \$\.targets\.config\.inner_config"):
        build("targets.config.inner_config.x=1")
    # an error of the inner factory names the inner component's path
    with pytest.raises(UserError, match=r"tiny\.toml @ \$\.targets\.config\.inner_config\.mask_token: mask_token 99 is outside"):
        build("targets.config.inner=mask", "targets.config.inner_config.mask_token=99")


def test_ctx_spec_is_set_after_the_task_and_an_error_while_building_it(tmp_path):
    class Peeking:
        @hookimpl
        def register_tasks(self, register):
            register("peek", FlipConfig, lambda config, ctx: ctx.spec)

    registry = load_registry(extra_plugins=(Peeking(),))
    resolved = load_recipe(tiny_recipe(tmp_path), registry, ["task.name=peek"])
    with pytest.raises(PluginError, match=r"\$\.task: ctx\.spec .* while the task itself is being built"):
        build_components(resolved, registry, tmp_path / "data")
    ctx = BuildContext(seed=0, n_sup=2, data_dir=tmp_path, component="$.targets")  # made by hand
    with pytest.raises(UserError, match=r"^\$\.targets\.config: bad$"):
        ctx.fail("bad", at="config")


def test_a_context_without_a_registry_refuses_to_build_and_says_how(tmp_path):
    # No silent fallback to whatever plugins are installed: the message names both ways to pass one.
    ctx = BuildContext(seed=0, n_sup=2, data_dir=tmp_path, component="$.targets")  # made by hand
    with pytest.raises(PluginError, match=r"^\$\.targets: ctx\.build\('target_generator', 'final'\) needs the "
                                          r"BuildContext's registry") as info:
        ctx.build("target_generator", "final")
    assert "registry=dis_core.wiring.plugins.load_registry()" in str(info.value)
    assert "dis_core.testing.context(task)" in str(info.value)
    # dis_core.testing hands plugin tests the installed plugins' registry explicitly.
    from dis_core import testing

    built = testing.context(n_sup=2, data_dir=tmp_path, component="$.targets").build("target_generator", "final")
    assert type(built).__name__ == "FinalTargets"


# ------------------------------------------------------------------ one path rule


def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    from dis_core.wiring.plugins import load_registry as fresh

    registry = fresh()
    sub = tmp_path / "recipes" / "deep"
    sub.mkdir(parents=True)
    # Only a test-split plan: no train plans, so every training example gets the fallback (an
    # empty file is an error).
    (sub / "plans.jsonl").write_text('{"example_id": 0, "split": "test", "steps": [[1]]}\n')
    base = tiny_recipe(sub, name="base.toml", targets="plan_import", extra="")
    base.write_text(base.read_text().replace('name = "plan_import"', 'name = "plan_import"\nconfig = { path = "plans.jsonl" }'))
    child = tmp_path / "recipes" / "child.toml"  # extends a recipe in another directory
    child.write_text('extends = "deep/base.toml"\n[train]\nsteps = 2\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    for recipe in (base, child):
        resolved = load_recipe(Path(os.path.relpath(recipe, elsewhere)), registry)
        path = resolved.component("targets")[1].path
        assert path.is_absolute() and path.resolve() == (sub / "plans.jsonl").resolve()
        assert Path(resolved.to_dict()["targets"]["config"]["path"]).is_absolute()  # saved with the run
        comp = build_components(resolved, registry, tmp_path / "data")
        assert comp.targets.path.resolve() == (sub / "plans.jsonl").resolve()

    # --set: relative to the current directory
    (elsewhere / "mine.jsonl").write_text("")
    resolved = load_recipe(child, registry, ["targets.config.path=mine.jsonl"])
    assert resolved.component("targets")[1].path == elsewhere / "mine.jsonl"
    # a task's data paths follow the same rule
    resolved = load_recipe(base, registry, ["task.name=sudoku", "task.config={ csv_train = 'x.csv' }"])
    assert resolved.component("task")[1].csv_train == elsewhere / "x.csv"
    resolved = resolve({**tomllib.loads(base.read_text()), "task": {"name": "sudoku", "config": {"csv_test": "t.csv"}}},
                       registry, base_dir=sub)
    assert resolved.component("task")[1].csv_test == sub / "t.csv"


# ------------------------------------------------------------------ --plugin


PLUGIN_SOURCE = '''
import attrs
from dis_core import hookimpl


@attrs.frozen(kw_only=True)
class NoOptions:
    """No options."""


class LastOnly:
    monotone = True

    def __call__(self, batch, n_sup, generator):
        y = batch["labels"]
        return y[:, None, :].expand(-1, n_sup, -1).clone()


def build(config, ctx):
    """y* at every step, from a --plugin module."""
    return LastOnly()


@hookimpl
def register_target_generators(register):
    register("{name}", NoOptions, build)
'''


def test_plugin_flag_loads_a_file_for_one_run(tmp_path, capsys):
    path = tmp_path / "flagged_targets.py"
    path.write_text(PLUGIN_SOURCE.format(name="flagged"))
    assert main(["plugins", "--json", "--plugin", str(path)]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "flagged")
    assert row["plugin"] == "flagged_targets" and row["loaded_by"] == "--plugin" and row["module_file"] == str(path)

    out = tmp_path / "run"
    recipe = tiny_recipe(tmp_path, targets="flagged", steps=2)
    assert main(["run", str(recipe), "--out", str(out), "--plugin", str(path), "--data-dir", str(tmp_path / "data")]) == 0
    plugins = json.loads((out / "run.json").read_text())["plugins"]
    assert {"kind": "target_generator", "name": "flagged", "plugin": "flagged_targets", "loaded_by": "--plugin"}.items() \
        <= next(p for p in plugins if p["name"] == "flagged").items()
    assert all("loaded_by" not in p for p in plugins if p["name"] != "flagged")
    capsys.readouterr()
    assert main(["run", str(recipe), "--dry-run"]) == 2  # without the flag it is unknown
    assert "unknown target_generator 'flagged'" in capsys.readouterr().err


def test_plugin_flag_takes_a_module_name(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "site" / "flagpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "gen.py").write_text(PLUGIN_SOURCE.format(name="modflag"))
    (pkg / "empty.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (module,) = load_plugin_modules(["flagpkg.gen"])
    registry = load_registry(extra_plugins=(module,))
    assert registry.get("target_generator", "modflag").plugin == "flagpkg.gen"
    assert main(["run", str(tiny_recipe(tmp_path, targets="modflag")), "--dry-run", "--plugin", "flagpkg.gen"]) == 0
    capsys.readouterr()

    for value, message in [("flagpkg.empty", "defines no @hookimpl"), ("flagpkg.nothere", "no module named 'flagpkg.nothere'"),
                           (str(tmp_path / "none.py"), "no such file")]:
        assert main(["plugins", "--plugin", value]) == 2
        err = capsys.readouterr().err
        assert message in err and value in err and "Traceback" not in err


def test_an_installed_module_without_hookimpls_is_a_warning(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "dis_hollow-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dis-hollow\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dis]\nhollow = hollow_plugin\n")
    (site / "hollow_plugin.py").write_text(textwrap.dedent('''
        import pluggy
        hookimpl = pluggy.HookimplMarker("not-dis")  # the wrong marker: dis sees no hook

        @hookimpl
        def register_tasks(register):
            pass
    '''))
    monkeypatch.syspath_prepend(str(site))
    with capture_logs() as logs:
        registry = load_registry()
    (warning,) = [e for e in logs if e.get("plugin") == "hollow"]
    assert warning["log_level"] == "warning" and "defines no @hookimpl" in warning["event"]
    assert warning["module"].endswith("hollow_plugin.py") and warning["entry_point"] == "hollow = hollow_plugin"
    assert ("backbone", "trm") in registry and not registry.broken
