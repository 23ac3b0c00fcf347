"""`dis compare`: reading run directories, the table, the Markdown file and the plot."""

import json
from pathlib import Path

import pytest

from dis_core.tools.compare import compare, curve, group_runs, is_per_step, load_run, series, table_rows
from dis_core.contract.errors import UserError


def write_run(path, name, *, n_sup, targets, halting, final, evals, params=860674, summary=True,
              seed=0, source=None, headline=None, lr=1e-3, eval_interval=10, wall=1.5):
    """A hand-written run directory: `evals` is [(training FLOPs, valid_solution_rate)] at steps
    10, 20, ...; examples are 80 a step-of-10, network calls 240, wall time `wall` s."""
    path.mkdir(parents=True)
    recipe = {
        "task": {"name": "nqueens", "config": {}},
        "backbone": {"name": "trm", "config": {}},
        "targets": {"name": targets, "config": {}},
        "halting": {"name": halting, "config": {}},
        "supervision": {"n_sup": n_sup},
        "train": {"seed": seed, "eval_interval": eval_interval, "log_interval": 1, "threads": 1,
                  "optimizer": {"name": "adamw", "config": {"lr": lr}}},
    }
    info = {"recipe": recipe, "name": name, "params": params,
            "network_calls_per_example_eval": 3 * n_sup, "flops_per_example_eval": 1e6 * n_sup}
    if source:
        info["recipe_source"] = source
    if headline:
        info["headline_metrics"] = headline
    (path / "run.json").write_text(json.dumps(info))
    rows = []
    for step, (flops, value) in enumerate(evals, start=1):
        cost = {"cost/optimizer_steps": step * 10, "cost/examples": step * 80, "cost/network_calls": step * 240,
                "cost/wall_time_s": step * wall}
        rows.append({"step": step * 10, "split": "train", "train/loss": 1.0 / step, "cost/flops": flops, **cost})
        rows.append({"step": step * 10, "split": "eval", "nqueens/valid_solution_rate": value,
                     "nqueens/exact_accuracy": value / 2, "exact/hamming@2": 1.0 - value, **cost})  # eval rows without cost/flops
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
    out = tmp_path / "report"
    text = compare(list(runs), out=out)
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["recipe", "n", "task", "backbone", "targets", "halting"]
    assert "eval calls/ex" in lines[0] and "nqueens/valid_solution_rate" in lines[0]
    dis_line = next(line for line in lines if line.startswith("dis "))  # no recipe_source: named by run
    assert "reveal" in dis_line and "fixed" in dis_line and "0.7500" in dis_line and "861k" in dis_line
    trm_line = next(line for line in lines if line.startswith("trm "))
    assert "act" in trm_line and "0.5000" in trm_line and "6.82M" in trm_line and "48" in trm_line.split()
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned
    assert lines[-1] == f"wrote {out / 'compare.md'} and {out / 'compare.png'}"

    md = (out / "compare.md").read_text()
    assert "| dis | 1 | nqueens | trm | reveal | fixed | 6 | 861k | 20 | 160 | 480 | 2.00e+09 | 3.0s | 18 | 6.00e+06 | 0.7500 | 0.3750 |" in md
    assert f"- **dis** (n=1): `{runs[0]}`" in md
    assert "![nqueens/valid_solution_rate vs training FLOPs](compare.png)" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["compare.md", "compare.png"]


def test_curve_takes_flops_from_train_rows(runs):
    xs, ys = curve(load_run(runs[1]), "nqueens/exact_accuracy")
    assert xs == [5e9, 1e10] and ys == [0.0625, 0.25]


def test_explicit_and_unknown_metric(runs, tmp_path):
    text = compare(list(runs), metric="nqueens/exact_accuracy")
    assert text.splitlines()[0].index("nqueens/exact_accuracy") < text.splitlines()[0].index("valid_solution_rate")
    with pytest.raises(UserError, match=r"available: .*nqueens/valid_solution_rate"):
        compare(list(runs), metric="nqueens/nope")


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
        compare([tmp_path / "missing-dir"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty is not a run directory"):
        compare([tmp_path / "empty"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match=r"bad: summary.json is not valid JSON"):
        compare([bad])
    (bad / "summary.json").write_text("{}")
    (bad / "metrics.jsonl").write_text('{"step": 1}\n[1]\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        load_run(bad)


def test_compare_two_real_tiny_runs(tmp_path, registry):
    """A DIS run and its TRM twin (final targets, ACT halting), trained for real, then compared."""
    from dis_core.wiring.recipe import load_recipe
    from dis_core.loop.trainer import Trainer

    from conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, steps=4)
    for name, sets in [("dis", []), ("trm", ["targets.name=final", "halting.name=act", "backbone.config.step_embedding=false"])]:
        resolved = load_recipe(recipe, registry, sets)
        Trainer(resolved, registry, tmp_path / name, data_dir=tmp_path / "data").fit(registry)
    info = json.loads((tmp_path / "dis" / "run.json").read_text())
    assert info["headline_metrics"] == ["exact/exact_accuracy", "nqueens/valid_solution_rate"]  # recipe order
    text = compare([tmp_path / "dis", tmp_path / "trm"], out=tmp_path / "cmp")
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "reveal_path" in table and "act" in table and "nqueens/valid_solution_rate" in table
    assert "![exact/exact_accuracy vs training FLOPs]" in table  # the first evaluator's headline
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    # both come from tiny.toml but differ in recipe: two rows, named by run
    dis_line = next(line for line in text.splitlines() if line.startswith("dis "))
    assert dis_line.split()[1] == "1" and f"{info['network_calls_per_example_eval']:g}" in dis_line.split()
    assert any(line.startswith("trm ") for line in text.splitlines())


def test_per_step_metrics_in_step_order(tmp_path):
    """`hamming@9` before `hamming@10`: a run's metrics and the table's columns count steps as numbers."""
    run = tmp_path / "steps"
    final = {"exact/hamming@10": 0.1, "exact/hamming@9": 0.2, "exact/accuracy": 0.5, "arc/pass@100": 1.0, "arc/pass@2": 0.5}
    write_run(run, "steps", n_sup=10, targets="final", halting="fixed", final=final, evals=[(1e9, 0.5)])
    ordered = ["arc/pass@2", "arc/pass@100", "exact/accuracy", "exact/hamming@2", "exact/hamming@9", "exact/hamming@10",
               "nqueens/exact_accuracy", "nqueens/valid_solution_rate"]
    assert load_run(run).metrics() == ordered
    header = compare([run], per_step=True).splitlines()[0]
    columns = [t for t in header.split() if "/" in t and not t.endswith("/ex")]
    assert columns == ["nqueens/valid_solution_rate", *ordered[:-1]]  # the plotted metric first, then the rest in order


# --------------------------------------------------------------------------------------------- studies


@pytest.fixture
def study(tmp_path):
    """Three seeds of one recipe (valid rate 0.5, 0.6, 0.7; one evaluated more often, which
    does not make it another recipe) and one run of a TRM twin."""
    dirs = []
    for seed, value, every in [(0, 0.5, 10), (1, 0.6, 10), (2, 0.7, 5)]:
        d = tmp_path / f"quick-s{seed}"
        write_run(d, d.name, n_sup=6, targets="reveal_path", halting="fixed", seed=seed, eval_interval=every,
                  source="recipes/nqueens_quick.toml", final={"nqueens/valid_solution_rate": value},
                  evals=[(1e9, value - 0.2), (2e9 + seed * 1e8, value)], wall=1.0 + seed)
        dirs.append(d)
    d = tmp_path / "trm-s0"
    write_run(d, d.name, n_sup=16, targets="final", halting="act", source="recipes/nqueens_quick_trm.toml",
              final={"nqueens/valid_solution_rate": 0.4}, evals=[(4e9, 0.3), (8e9, 0.4)])
    return [*dirs, d]


def test_seeds_grouped_mean_std_n(study):
    runs = [load_run(d) for d in study]
    groups = group_runs(runs)
    assert [(g.label, len(g.runs)) for g in groups] == [("nqueens_quick", 3), ("nqueens_quick_trm", 1)]
    headers, rows = table_rows(groups, ["nqueens/valid_solution_rate"])
    cell = dict(zip(headers, rows[0]))
    assert cell["n"] == "3" and cell["nqueens/valid_solution_rate"] == "0.6000 ± 0.1000"  # sample std
    assert cell["wall"] == "4.0s"  # mean of 2, 4 and 6 s: cost columns are means over the seeds
    assert cell["eval calls/ex"] == "18" and cell["eval FLOPs/ex"] == "6.00e+06"
    trm = dict(zip(headers, rows[1]))
    assert trm["n"] == "1" and trm["nqueens/valid_solution_rate"] == "0.4000" and trm["eval calls/ex"] == "48"

    text = compare(study)
    assert [line.split()[:2] for line in text.splitlines()[2:]] == [["nqueens_quick", "3"], ["nqueens_quick_trm", "1"]]


def test_different_recipes_stay_apart_and_are_named_by_run(tmp_path, study):
    other = tmp_path / "quick-lr3e-3"  # same recipe file, another learning rate: another recipe
    write_run(other, other.name, n_sup=6, targets="reveal_path", halting="fixed", lr=3e-3,
              source="recipes/nqueens_quick.toml", final={"nqueens/valid_solution_rate": 0.9}, evals=[(1e9, 0.9)])
    groups = group_runs([load_run(d) for d in [*study, other]])
    # the stem names two groups now, so both are named by their first run
    assert [(g.label, len(g.runs)) for g in groups] == [("quick-s0 +2", 3), ("nqueens_quick_trm", 1), ("quick-lr3e-3", 1)]


def test_no_group_keeps_one_row_per_run(study):
    lines = compare(study, group=False).splitlines()
    assert lines[0].split()[:2] == ["run", "task"]
    assert [line.split()[0] for line in lines[2:]] == ["quick-s0", "quick-s1", "quick-s2", "trm-s0"]
    assert not any("±" in line for line in lines)


def test_x_axis_choice(study):
    groups = group_runs([load_run(d) for d in study])
    by_x = {x: series(groups, "nqueens/valid_solution_rate", x) for x in ("train_flops", "train_calls", "examples", "wall")}
    quick = {x: s[0] for x, s in by_x.items()}
    assert quick["train_flops"].x == [1e9, 2.1e9]  # mean over the seeds at each eval step
    assert quick["train_calls"].x == [240, 480]
    assert quick["examples"].x == [80, 160]
    assert quick["wall"].x == [2.0, 4.0]
    assert quick["wall"].y == pytest.approx([0.4, 0.6]) and quick["wall"].std == pytest.approx([0.1, 0.1])
    assert quick["wall"].label == "nqueens_quick (n=3)"
    assert by_x["examples"][1].x == [80, 160] and by_x["examples"][1].std == [0.0, 0.0]
    xs, _ = curve(load_run(study[3]), "nqueens/valid_solution_rate", "train_calls")
    assert xs == [240, 480]
    with pytest.raises(UserError, match="--x 'steps': choose one of train_flops, train_calls, examples, wall"):
        compare(study, x="steps")


def first_metric(text):
    """The first metric column of a printed table (the plotted one)."""
    return next(t for t in text.splitlines()[0].split() if "/" in t and not t.endswith("/ex"))


def test_headline_metric_is_the_default(tmp_path, study):
    """A third-party evaluator's headline wins over the builtin fallbacks; runs without
    `headline_metrics` (written before it existed) fall back to */valid_solution_rate."""
    assert first_metric(compare(study)) == "nqueens/valid_solution_rate"
    parity = tmp_path / "parity"
    write_run(parity, "parity", n_sup=6, targets="final", halting="fixed",
              headline=["parity/parity_accuracy", "nqueens/valid_solution_rate"],
              final={"parity/parity_accuracy": 0.8, "parity/sequence_accuracy": 0.1}, evals=[(1e9, 0.5)])
    assert first_metric(compare([*study, parity])) == "parity/parity_accuracy"
    out = tmp_path / "out"
    compare([*study, parity], out=out, x="examples")
    assert "![parity/parity_accuracy vs training examples](compare.png)" in (out / "compare.md").read_text()
    # a headline no run logged is skipped
    (parity / "summary.json").write_text(json.dumps({"nqueens/valid_solution_rate": 0.5}))
    (parity / "metrics.jsonl").write_text("")
    assert first_metric(compare([parity])) == "nqueens/valid_solution_rate"


def test_no_files_without_out(study, tmp_path, monkeypatch, capsys):
    from dis_core.tools.cli import main

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["compare", *map(str, study)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("recipe") and "wrote" not in printed
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before

    assert main(["compare", *map(str, study), "--out", "figs", "--x", "wall", "--no-group"]) == 0
    assert f"wrote {Path('figs') / 'compare.md'} and {Path('figs') / 'compare.png'}" in capsys.readouterr().out
    assert "![nqueens/valid_solution_rate vs wall time (s)](compare.png)" in (cwd / "figs" / "compare.md").read_text()
    (cwd / "old.md").write_text("a results document")
    assert main(["compare", *map(str, study), "--out", "old.md"]) == 2  # not overwritten
    assert "not a directory" in capsys.readouterr().err and (cwd / "old.md").read_text() == "a results document"


def test_per_step_columns_only_on_request(study):
    assert "exact/hamming@2" not in compare(study).splitlines()[0]
    assert "exact/hamming@2" in compare(study, per_step=True).splitlines()[0]
    assert "exact/hamming@2" in compare(study, metric="exact/hamming@2").splitlines()[0]  # asked for by name
    assert is_per_step("exact/hamming@3") and is_per_step("nqueens/valid@12")
    assert not is_per_step("arc/pass@2") and not is_per_step("nqueens/exact_accuracy")


def test_eval_calls_on_the_x_axis(tmp_path):
    """--x eval_calls plots the metric against what an answer cost at each evaluation."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"name": "r", "recipe": {"train": {"seed": 0}}}))
    rows = [{"step": 10, "split": "eval", "x/acc": 0.5, "diagnostics/calls_per_example": 12.0},
            {"step": 20, "split": "eval", "x/acc": 0.7, "diagnostics/calls_per_example": 9.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert curve(load_run(run), "x/acc", "eval_calls") == ([12.0, 9.0], [0.5, 0.7])


def test_one_run_given_twice_and_a_resumed_twin_count_once(tmp_path, study):
    """A run named twice, or a copy of a run (same recipe, same seed: e.g. a resumed twin), is
    one measurement: pooled once, and the output names what was left out."""
    twin = tmp_path / "quick-s1-resumed"
    write_run(twin, twin.name, n_sup=6, targets="reveal_path", halting="fixed", seed=1,
              source="recipes/nqueens_quick.toml", final={"nqueens/valid_solution_rate": 0.6}, evals=[(1e9, 0.4), (2.1e9, 0.6)])
    text = compare([study[0], study[0], study[1], twin])
    row = text.splitlines()[2].split()
    assert row[:2] == ["nqueens_quick", "2"]  # seeds 0 and 1, not n = 4
    assert f"note: {study[0]} is {study[0]} given again: counted once" in text
    assert f"note: {twin} repeats seed 1 of {study[1]}" in text
    assert "0.5500 ± 0.0707" in text  # mean and sample std of 0.5 and 0.6 only
