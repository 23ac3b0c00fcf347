"""Recipe loading: strict typing, collected path-addressed errors, extends, --set, every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from dis_core.contract.errors import RecipeError
from dis_core.wiring.recipe import apply_overrides, load_raw, load_recipe

from conftest import ROOT, tiny_recipe


def test_tiny_recipe_resolves(tmp_path, registry):
    resolved = load_recipe(tiny_recipe(tmp_path), registry)
    name, cfg = resolved.component("backbone")
    assert name == "trm" and cfg.hidden_size == 32
    data = resolved.to_dict()
    assert data["backbone"]["config"]["num_heads"] == 2
    assert data["train"]["optimizer"]["config"]["lr"] == 1e-3
    assert data["supervision"]["step_weights"] == "uniform"  # defaults are filled in


def test_all_errors_collected_with_file_and_path(tmp_path, registry):
    path = tiny_recipe(tmp_path)
    text = path.read_text().replace("hidden_size = 32", "hiddn = 32").replace('name = "exact"', 'name = "exactt"')
    text = text.replace("global_batch_size = 8", 'global_batch_size = "8"')
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry)
    msg = str(info.value)
    assert str(path) in msg
    # A type error of the recipe's own keys does not stop the component pass (tests/test_recipe_errors.py).
    assert len(info.value.problems) == 3
    at = sorted(p.rpartition(" @ ")[2] for p in info.value.problems)  # each problem names its key
    assert at == ["$.backbone.config", "$.evaluators[0].name", "$.train.global_batch_size"]
    assert all(p in msg for p in info.value.problems)


def test_component_errors_collected_together(tmp_path, registry):
    path = tiny_recipe(tmp_path)
    path.write_text(path.read_text().replace("hidden_size = 32", "hiddn = 32").replace('name = "exact"', 'name = "exactt"'))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry)
    err = info.value
    assert len(err.problems) == 2
    joined = "\n".join(err.problems)
    assert "extra fields found (hiddn) @ $.backbone.config" in joined
    assert "unknown evaluator 'exactt'" in joined and "$.evaluators[0].name" in joined and "nqueens" in joined


def test_validator_message_is_kept(tmp_path, registry):
    path = tiny_recipe(tmp_path, extra="")
    path.write_text(path.read_text().replace("steps = 6", "steps = -1"))
    with pytest.raises(RecipeError, match="steps must be > 0"):
        load_recipe(path, registry)


def test_quoted_number_is_a_type_error(tmp_path, registry):
    with pytest.raises(RecipeError, match=r"lr"):
        load_recipe(tiny_recipe(tmp_path), registry, ["train.optimizer.config.lr='0.1'"])


def test_set_overrides_with_type_checking(tmp_path, registry):
    path = tiny_recipe(tmp_path)
    resolved = load_recipe(path, registry, ["train.steps=11", "backbone.config.hidden_size=64", "targets.name=final"])
    assert resolved.recipe.train.steps == 11
    assert resolved.component("backbone")[1].hidden_size == 64
    assert resolved.component("targets")[0] == "final"
    with pytest.raises(RecipeError, match="expected int"):
        load_recipe(path, registry, ["train.steps=eleven"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(path, registry, ["train.steps"])


def test_set_name_drops_old_config():
    data = {"backbone": {"name": "trm", "config": {"hidden_size": 3}}}
    assert apply_overrides(data, ["backbone.name=hrm"]) == {"backbone": {"name": "hrm"}}
    assert apply_overrides(data, ["backbone.config.hidden_size=4"])["backbone"]["config"] == {"hidden_size": 4}


def test_extends_merges_and_replaces_changed_components(tmp_path, registry):
    tiny_recipe(tmp_path, name="base.toml")
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n[train]\nsteps = 2\n[targets]\nname = "mask"\nconfig = { schedule = "linear" }\n')
    data = load_raw(child)
    assert data["train"]["steps"] == 2 and data["train"]["global_batch_size"] == 8
    assert data["targets"] == {"name": "mask", "config": {"schedule": "linear"}}
    load_recipe(child, registry)


def test_extends_errors(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('extends = "b.toml"\n')
    b.write_text('extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="cycle"):
        load_raw(a)
    c = tmp_path / "c.toml"
    c.write_text('extends = "missing.toml"\n')
    with pytest.raises(RecipeError, match="missing.toml"):
        load_raw(c)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(RecipeError, match="not valid TOML") as info:
        load_raw(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(RecipeError, match="file not found"):
        load_raw(tmp_path / "nope.toml")


RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


def test_there_are_recipes():
    assert any(p.name == "nqueens_quick.toml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_resolves(path: Path, registry):
    resolved = load_recipe(path, registry)
    text = path.read_text()
    assert text.lstrip().startswith("#"), "recipes open with a comment: purpose and launch command"
    assert "dis-run" in text or "deepspeed" in text
    assert resolved.to_dict()["task"]["name"]


def test_steps_and_epochs_replace_each_other(tmp_path, registry):
    path = tiny_recipe(tmp_path)
    resolved = load_recipe(path, registry, ["train.epochs=2.5"])
    assert resolved.recipe.train.epochs == 2.5 and resolved.recipe.train.steps is None
    back = load_recipe(path, registry, ["train.epochs=2.5", "train.steps=4"])
    assert back.recipe.train.steps == 4 and back.recipe.train.epochs is None
    child = tmp_path / "child.toml"
    child.write_text('extends = "tiny.toml"\n[train]\nepochs = 1.0\n')
    assert load_recipe(child, registry).recipe.train.steps is None


def test_choice_error_lists_the_choices(tmp_path, registry):
    with pytest.raises(RecipeError, match=r"expected one of 'uniform', 'linear'\) @ \$.supervision.step_weights"):
        load_recipe(tiny_recipe(tmp_path), registry, ["supervision.step_weights=lin"])


def test_extends_naming_a_directory_says_so(tmp_path, registry):
    (tmp_path / "base").mkdir()
    child = tmp_path / "child.toml"
    child.write_text('extends = "base"\n')
    with pytest.raises(RecipeError, match=r"extends names a directory 'base'"):
        load_recipe(child, registry)
