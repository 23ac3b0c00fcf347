"""`supervision.step_input` follows the method when unset: a TRM baseline written without it
feeds the question, never its own answers; an explicit setting wins; a mix of the two methods
is said by --dry-run and recorded in run.json."""

import json
import re

import pytest

from dis_core.tools.cli import main
from dis_core.wiring.plugins import load_registry
from dis_core.wiring.recipe import load_recipe
from dis_core.step.supervision import StepRule

TRM_LIKE = """
[task]
name = "nqueens"
config = {{ board_size = 4, num_train = 8, num_test = 4, augment = false }}
[backbone]
name = "trm"
config = {{ hidden_size = 16, num_heads = 2, num_layers = 1, T = 1, n = 1 }}
[targets]
name = "{targets}"
[halting]
name = "{halting}"
[supervision]
n_sup = 2
{step_input}
[[evaluators]]
name = "exact"
[train]
global_batch_size = 4
steps = 2
threads = 1
"""


def write(tmp_path, targets="final", halting="act", step_input=""):
    path = tmp_path / f"{targets}-{halting}.toml"
    path.write_text(TRM_LIKE.format(targets=targets, halting=halting, step_input=step_input))
    return path


@pytest.mark.parametrize("targets, expected", [("final", "question"), ("reveal_path", "prediction")])
def test_unset_step_input_follows_the_targets(tmp_path, targets, expected):
    resolved = load_recipe(write(tmp_path, targets=targets), load_registry())
    assert resolved.recipe.supervision.step_input == expected
    assert resolved.to_dict()["supervision"]["step_input"] == expected  # the resolved recipe says it
    assert StepRule.of(resolved.recipe.supervision).next_tokens("pred", "x") == ("x" if expected == "question" else "pred")


def test_an_explicit_step_input_wins(tmp_path):
    resolved = load_recipe(write(tmp_path, step_input='step_input = "prediction"'), load_registry())
    assert resolved.recipe.supervision.step_input == "prediction"


def test_a_mix_of_methods_is_said_by_dry_run(tmp_path, capsys):
    path = write(tmp_path, step_input='step_input = "prediction"')
    assert main(["run", str(path), "--dry-run", "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^method +neither \(step_input = 'prediction'\)$", out, re.M), out  # its row, any column width
    assert "note: final targets with step_input = 'prediction' match neither official method" in out

    assert main(["run", str(write(tmp_path)), "--dry-run", "--json", "--data-dir", str(tmp_path / "data")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == {"method": "TRM", "note": None, "step_input": "question"}


def test_run_json_records_the_method(tmp_path):
    out = tmp_path / "run"
    path = write(tmp_path, targets="reveal_path", halting="fixed", step_input='step_input = "question"')
    assert main(["run", str(path), "--out", str(out), "--data-dir", str(tmp_path / "data")]) == 0
    method = json.loads((out / "run.json").read_text())["method"]
    assert method["method"] == "neither" and method["step_input"] == "question"
    assert "per-step targets ('reveal_path') with step_input = 'question'" in method["note"]
