"""The slot table (dis_core/contract/slots.py) drives hookspecs, registry, recipes, building and `dis plugins`;
factories build through `ctx.build` and report through `ctx.fail`; one path rule for recipes;
`--plugin` modules; installed plugin modules without @hookimpl."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Protocol, runtime_checkable

import attrs
import pytest
import tomllib
from structlog.testing import capture_logs

from dis_core import hookimpl
from dis_core.contract import hookspecs
from dis_core.wiring.build import build_components
from dis_core.tools.cli import main, plugin_rows
from dis_core.contract.errors import PluginError, RecipeError, UserError
from dis_core.contract.interfaces import BuildContext
from dis_core.wiring.plugins import load_plugin_modules, load_registry
from dis_core.wiring.recipe import load_recipe, resolve
from dis_core.contract.slots import SLOTS, Slot, parts

from conftest import ROOT, tiny_recipe


# ------------------------------------------------------------------ the table is the one place


def test_the_builtin_table_maps_every_name_of_a_kind():
    row = next(s for s in SLOTS if s.kind == "target_generator")
    assert (row.key, row.hook, row.interface().__name__, row.attribute) == (
        "targets", "register_target_generators", "TargetGenerator", "targets")
    assert SLOTS[0].kind == "task"  # built first: later factories see it
    hooks = {n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, f"{hookspecs.PROJECT}_spec")}
    assert hooks == {s.hook for s in SLOTS}
    assert parts("evaluators[1].config.x") == ("evaluators", 1, "config", "x")


def test_docs_describe_every_slot():
    hooks, recipes = ((ROOT / "docs" / name).read_text() for name in ("hooks.md", "recipes.md"))
    for slot in SLOTS:
        section = f"`[[{slot.key}]]`" if slot.many else f"`[{slot.key}]`"
        assert f"| `{slot.hook}` | `{slot.kind}` | {section} |" in hooks, slot  # the table atop docs/hooks.md
        assert f"\n## {section}\n" in recipes, f"docs/recipes.md needs the section '## {section}'"
        absent = "required" if slot.default is None else f"`{slot.default}`"
        assert f"| {section} | {slot.kind} | {absent}" in recipes or (slot.many and f"| {section} | {slot.kind} |" in recipes), slot


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
