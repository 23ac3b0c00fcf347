"""The command line: exit codes and messages for user mistakes, dry-run figures, plugin listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dis_core.tools.cli import main

from conftest import ROOT, subprocess_env, tiny_recipe


def _cli(args, cwd=None):
    env = subprocess_env()
    return subprocess.run([sys.executable, "-m", "dis_core.tools.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.replace('name = "trm"', 'name = "trn"'), "unknown backbone 'trn'"),
        (lambda t: t.replace("hidden_size = 32", "hiddn = 32"), "extra fields found (hiddn) @ $.backbone.config"),
        (lambda t: t + "\n[bogus]\nx = 1\n", "extra fields found (bogus) @ $"),
        (lambda t: t.replace("num_heads = 2", "num_heads = 3"), "@ $.backbone"),
        (lambda t: t.replace("[task]", "[task"), "not valid TOML"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, capsys, edit, expected):
    path = tiny_recipe(tmp_path)
    path.write_text(edit(path.read_text()))
    code = main(["run", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and str(path) in err
    assert "Traceback" not in err


def test_missing_recipe_file(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_bad_set_exits_2(tmp_path, capsys):
    assert main(["run", str(tiny_recipe(tmp_path)), "--set", "train.steps=x1", "--dry-run"]) == 2
    assert "$.train.steps" in capsys.readouterr().err


def test_dry_run_json_figures(tmp_path, capsys):
    assert main(["run", str(tiny_recipe(tmp_path)), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params", "network_calls_per_example_train", "network_calls_per_example_eval", "flops_per_example_train"):
        assert key in out
    assert out["network_calls_per_example_train"] == 3 * 3  # n_sup 3 x (n + 1) calls
    assert out["recipe"]["backbone"]["config"]["hidden_size"] == 32


def test_dry_run_text_prints_resolved_recipe(tmp_path, capsys):
    assert main(["run", str(tiny_recipe(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[backbone.config]" in out or "[backbone]" in out
    assert "network_calls_per_example_train" in out


def test_plugins_listing(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"kind": "backbone", "name": "trm", "plugin": "trm"}.items() <= rows[[r["name"] for r in rows].index("trm")].items()
    assert all(r["version"] for r in rows)
    assert main(["plugins"]) == 0
    assert "reveal_path" in capsys.readouterr().out


def test_dis_run_end_to_end_and_refuses_to_overwrite(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=3)
    out = tmp_path / "run"
    first = _cli(["run", str(recipe), "--out", str(out)], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["step"] == 3
    again = _cli(["run", str(recipe), "--out", str(out)], cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    # extending a finished run with --resume continues from its last checkpoint
    more = _cli(["run", str(recipe), "--out", str(out), "--resume", "--set", "train.steps=5"], cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["step"] == 5
    changed = _cli(["run", str(recipe), "--out", str(out), "--resume", "--set", "train.seed=3"], cwd=tmp_path)
    assert changed.returncode == 2 and "train.seed" in changed.stderr


def test_dis_run_console_script_exists():
    scripts = os.path.dirname(sys.executable)
    assert os.path.exists(os.path.join(scripts, "dis-run")) and os.path.exists(os.path.join(scripts, "dis"))


def test_dry_run_json_stdout_is_pure_json(tmp_path):
    # Log lines (task preparation, warnings) go to stderr, so stdout parses as one JSON object.
    res = _cli(["run", str(tiny_recipe(tmp_path)), "--dry-run", "--json"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["params"] > 0


def test_bench_prints_throughput_figures(tmp_path):
    res = _cli(["bench", str(tiny_recipe(tmp_path)), "--steps", "2", "--warmup", "1", "--data-dir", str(tmp_path / "data"),
                "--set", "train.precision=fp32"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "examples x steps / s" in res.stdout and "GFLOP/s" in res.stdout and "of the measured fp32 matmul peak" in res.stdout
    assert "precision fp32" in res.stdout


def test_bench_in_bf16_measures_against_the_bf16_peak(tmp_path):
    res = _cli(["bench", str(tiny_recipe(tmp_path)), "--steps", "2", "--warmup", "1", "--data-dir", str(tmp_path / "data"),
                "--set", "train.precision=bf16"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "precision bf16" in res.stdout and "of the measured bf16 matmul peak" in res.stdout
