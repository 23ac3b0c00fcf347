"""`dis compare`: reading run directories, the table, the Markdown file and the plot."""

import json

import pytest

from dis_core.compare import compare, curve, load_run
from dis_core.errors import UserError


def write_run(path, name, *, n_sup, targets, halting, final, evals, params=860674, summary=True):
    path.mkdir(parents=True)
    recipe = {
        "task": {"name": "nqueens", "config": {}},
        "backbone": {"name": "trm", "config": {}},
        "targets": {"name": targets, "config": {}},
        "halting": {"name": halting, "config": {}},
        "supervision": {"n_sup": n_sup},
    }
    (path / "run.json").write_text(json.dumps({"recipe": recipe, "name": name, "params": params}))
    rows = []
    for step, (flops, value) in enumerate(evals, start=1):
        cost = {"cost/optimizer_steps": step * 10, "cost/examples": step * 80, "cost/network_calls": step * 240,
                "cost/wall_time_s": step * 1.5}
        rows.append({"step": step * 10, "split": "train", "train/loss": 1.0 / step, "cost/flops": flops, **cost})
        rows.append({"step": step * 10, "split": "eval", "nqueens/valid_solution_rate": value,
                     "nqueens/exact_accuracy": value / 2, **cost})  # eval rows without cost/flops
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (path / "summary.json").write_text(json.dumps({**final, **rows[-1], "split": None}))


@pytest.fixture
def runs(tmp_path):
    a, b = tmp_path / "dis-run", tmp_path / "trm-run"
    write_run(a, "dis", n_sup=6, targets="reveal", halting="fixed",
              final={"nqueens/valid_solution_rate": 0.75}, evals=[(1e9, 0.25), (2e9, 0.75)])
    write_run(b, "trm", n_sup=16, targets="final", halting="act", params=6819842,
              final={"nqueens/valid_solution_rate": 0.5}, evals=[(5e9, 0.125), (1e10, 0.5)])
    return a, b


def test_table_markdown_and_plot(runs, tmp_path):
    out = tmp_path / "report" / "cmp.md"
    out.parent.mkdir()
    text = compare(list(runs), out=out)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["run", "task", "backbone", "targets", "halting"]
    assert "nqueens/valid_solution_rate" in lines[0]
    dis_line = next(line for line in lines if line.startswith("dis "))
    assert "reveal" in dis_line and "fixed" in dis_line and "0.7500" in dis_line and "861k" in dis_line
    trm_line = next(line for line in lines if line.startswith("trm "))
    assert "act" in trm_line and "0.5000" in trm_line and "6.82M" in trm_line
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned

    md = out.read_text()
    assert "| dis | nqueens | trm | reveal | fixed | 6 | 861k | 20 | 160 | 480 | 2.00e+09 | 3.0s | 0.7500 |" in md
    assert "![nqueens/valid_solution_rate vs training FLOPs](cmp.png)" in md
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_takes_flops_from_train_rows(runs):
    xs, ys = curve(load_run(runs[1]), "nqueens/exact_accuracy")
    assert xs == [5e9, 1e10] and ys == [0.0625, 0.25]


def test_explicit_and_unknown_metric(runs, tmp_path):
    text = compare(list(runs), metric="nqueens/exact_accuracy", out=tmp_path / "x.md")
    assert text.splitlines()[0].index("nqueens/exact_accuracy") < text.splitlines()[0].index("valid_solution_rate")
    with pytest.raises(UserError, match=r"available: .*nqueens/valid_solution_rate"):
        compare(list(runs), metric="nqueens/nope", out=tmp_path / "y.md")


def test_running_run_without_summary(tmp_path):
    run = tmp_path / "live"
    write_run(run, "live", n_sup=6, targets="final", halting="fixed", final={}, evals=[(1e9, 0.25), (3e9, 0.5)], summary=False)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 30, "spl')  # a line still being written
    loaded = load_run(run)
    assert loaded.final["nqueens/valid_solution_rate"] == 0.5 and loaded.final["cost/optimizer_steps"] == 20
    assert loaded.final["cost/flops"] == 3e9  # eval rows lack it: taken from the last train row


def test_bad_run_directories(tmp_path):
    with pytest.raises(UserError, match="missing-dir"):
        compare([tmp_path / "missing-dir"], out=tmp_path / "c.md")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty is not a run directory"):
        compare([tmp_path / "empty"], out=tmp_path / "c.md")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match=r"bad: summary.json is not valid JSON"):
        compare([bad], out=tmp_path / "c.md")
    (bad / "summary.json").write_text("{}")
    (bad / "metrics.jsonl").write_text('{"step": 1}\n[1]\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        load_run(bad)


def test_compare_two_real_tiny_runs(tmp_path, registry):
    """A DIS run and its TRM twin (final targets, ACT halting), trained for real, then compared."""
    from dis_core.recipe import load_recipe
    from dis_core.trainer import Trainer

    from conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, steps=4)
    for name, sets in [("dis", []), ("trm", ["targets.name=final", "halting.name=act", "backbone.config.step_embedding=false"])]:
        resolved = load_recipe(recipe, registry, sets)
        Trainer(resolved, registry, tmp_path / name, data_dir=tmp_path / "data").fit(registry)
    text = compare([tmp_path / "dis", tmp_path / "trm"], out=tmp_path / "cmp" / "table.md")
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "reveal_path" in table and "act" in table and "nqueens/valid_solution_rate" in table
    assert (tmp_path / "cmp" / "table.png").stat().st_size > 1000
    assert "dis" in text and "trm" in text


def test_per_step_metrics_in_step_order():
    from dis_core.compare import _metric_order

    keys = ["exact/hamming@10", "exact/hamming@9", "exact/accuracy", "arc/pass@100", "arc/pass@2"]
    assert sorted(keys, key=_metric_order) == ["arc/pass@2", "arc/pass@100", "exact/accuracy", "exact/hamming@9", "exact/hamming@10"]
