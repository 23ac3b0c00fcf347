"""Every problem of a recipe in one report: the three loading passes (files and `--set`, the
recipe's own keys, the component configs) each add theirs, and none hides another's."""

from __future__ import annotations

import pytest

from dis_core.contract.errors import RecipeError
from dis_core.wiring.recipe import load_recipe

from conftest import tiny_recipe


def _problems(path, registry, overrides=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry, overrides)
    err = info.value
    assert str(path) in str(err)  # one report, named by the recipe file
    assert str(err).count("\n  - ") == len(err.problems)  # a line per problem
    return err.problems


def _edit(path, *pairs: tuple[str, str]):
    text = path.read_text()
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def test_three_typos_and_an_unknown_name_are_four_lines(tmp_path, registry):
    # Before, the top-level and [train] typos (pass 2) stopped loading, and the other two
    # appeared only on the next run.
    path = _edit(tiny_recipe(tmp_path), ("description =", "descripton ="), ("log_interval = 1", "log_intervall = 1"),
                 ("hidden_size = 32", "hiddn = 32"), ('name = "exact"', 'name = "exactt"'))
    problems = _problems(path, registry)
    assert len(problems) == 4, problems
    assert "extra fields found (descripton) @ $" in problems
    assert "extra fields found (log_intervall) @ $.train" in problems
    assert "extra fields found (hiddn) @ $.backbone.config" in problems
    [unknown] = [p for p in problems if p.startswith("unknown evaluator 'exactt'")]
    assert unknown.endswith("@ $.evaluators[0].name") and "nqueens" in unknown  # what is available


def test_a_wrong_type_does_not_hide_the_components_problems(tmp_path, registry):
    path = _edit(tiny_recipe(tmp_path), ("global_batch_size = 8", 'global_batch_size = "8"'),
                 ('name = "adamw"', 'name = "adamv"'), ("board_size = 5", "board_sise = 5"))
    problems = _problems(path, registry)
    assert len(problems) == 3, problems
    assert any(p.endswith("@ $.train.global_batch_size") and "expected int" in p for p in problems)
    assert any(p.startswith("unknown optimizer 'adamv'") and p.endswith("@ $.train.optimizer.name") for p in problems)
    assert "extra fields found (board_sise) @ $.task.config" in problems


def test_a_value_out_of_range_and_a_cross_field_error_come_with_the_rest(tmp_path, registry):
    # steps and epochs together fail a check of the whole [train] table; before, that alone was reported.
    path = _edit(tiny_recipe(tmp_path), ("steps = 6", "steps = 6\nepochs = 1.0"), ("n_sup = 3", "n_sup = 0"),
                 ("num_heads = 2", "num_heads = 2, typo = 1"))
    problems = _problems(path, registry)
    assert len(problems) == 3, problems
    assert "invalid value (set exactly one of train.steps and train.epochs) @ $.train" in problems
    assert "invalid value (n_sup must be > 0, got 0) @ $.supervision" in problems
    assert "extra fields found (typo) @ $.backbone.config" in problems


def test_bad_overrides_are_reported_with_the_recipes_problems(tmp_path, registry):
    path = _edit(tiny_recipe(tmp_path), ("hidden_size = 32", "hiddn = 32"))
    problems = _problems(path, registry, ["evaluators.5.name=exact", "train.steps", "train.seed=3", "halting.name=fixd"])
    assert len(problems) == 4, problems
    assert "--set 'evaluators.5.name=exact': no item 5 in evaluators" in problems
    assert any(p.startswith("--set 'train.steps': expected KEY=VALUE") for p in problems)
    assert "extra fields found (hiddn) @ $.backbone.config" in problems
    assert any(p.startswith("unknown halting 'fixd'") for p in problems)  # a good override is applied


def test_a_missing_section_and_a_malformed_table_leave_the_other_components_checked(tmp_path, registry):
    text = tiny_recipe(tmp_path).read_text()
    start = text.index("[backbone]")
    text = text[:start] + text[text.index("[targets]"):]  # no [backbone] at all
    path = tmp_path / "tiny.toml"
    path.write_text(text.replace('name = "reveal_path"', 'name = "reveal_path"\nconfig = 3')
                    .replace("board_size = 5", "board_size = 5, colour = 1"))
    problems = _problems(path, registry)
    # pass 2 reports the missing table and the config that is no table; pass 3 does not repeat
    # the latter, and still checks the task's config
    assert problems == ["required field missing @ $.backbone", "expected a mapping @ $.targets.config",
                        "extra fields found (colour) @ $.task.config"]


def test_a_sound_recipe_still_loads_with_overrides(tmp_path, registry):
    # The collecting must not turn good overrides into problems.
    resolved = load_recipe(tiny_recipe(tmp_path), registry, ["train.seed=3", "evaluators.1.name=exact",
                                                             "evaluators.0.name=nqueens"])
    assert resolved.recipe.train.seed == 3
    assert [spec.name for spec in resolved.recipe.evaluators] == ["nqueens", "exact"]
