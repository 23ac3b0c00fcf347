"""`dis study`: the study file, the plan, selection on the validation split, the report.

Selection and the report are tested without training, with a runner that writes run directories
holding planted validation curves and test values; one tiny study runs for real through the
`dis-run` / `dis eval` subprocesses."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import tomli_w

from conftest import ROOT, tiny_recipe
from dis_core.tools import study as st
from dis_core.tools import study_report as sr
from dis_core.tools.cli import main

METRIC = "nqueens/valid_solution_rate"


def write_study(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    tiny_recipe(tmp_path, steps=4)
    path = tmp_path / name
    path.write_text(text)
    return path


TWO_ARMS = """
name = "planted"
seeds = [0, 1, 2]
metric = "nqueens/valid_solution_rate"
budget = ["train.steps=4", "train.eval_interval=2"]
[[arms]]
name = "a"
recipe = "tiny.toml"
grid = { "train.optimizer.config.lr" = [1e-3, 1e-2] }
[[arms]]
name = "b"
recipe = "tiny.toml"
set = ["targets.name=final"]
"""


class PlantedRunner:
    """Writes what a finished run leaves (run.json, recipe.toml, metrics.jsonl, summary.json,
    checkpoints with metrics.json) from planted validation curves, and test metrics from planted
    test values per checkpoint step; records every call."""

    def __init__(self, registry, curves: dict[str, list[tuple[int, float]]], tests: dict[tuple[str, int], float],
                 rc: dict[str, int] | None = None):
        self.registry, self.curves, self.tests, self.rc = registry, curves, tests, rc or {}
        self.trained: list[str] = []
        self.resumed: list[str] = []
        self.tested: list[tuple[str, str]] = []

    def train(self, run, *, resume: bool, log: Path) -> int:
        from dis_core.wiring.recipe import load_recipe

        self.trained.append(run.path.name)
        if resume:
            self.resumed.append(run.path.name)
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / "recipe.toml").write_text(tomli_w.dumps(load_recipe(run.recipe, self.registry, list(run.overrides)).to_dict()))
        if self.rc.get(run.path.name):
            return self.rc[run.path.name]
        curve = self.curves[run.path.name]
        cost = {"cost/optimizer_steps": 4, "cost/network_calls": 96.0, "cost/flops": 4e8, "cost/examples": 16,
                "cost/wall_time_s": 36.0}
        (run.path / "run.json").write_text(json.dumps({
            "name": run.path.name, "recipe_source": str(run.recipe), "world_size": 2, "params": 1000,
            "puzzle_table_bytes": 400, "headline_metrics": [METRIC], "network_calls_per_example_eval": 9,
            "flops_per_example_eval": 1e7}))
        (run.path / "metrics.jsonl").write_text("".join(
            json.dumps({"step": step, "split": "eval", METRIC: value, **cost}) + "\n" for step, value in curve))
        (run.path / "summary.json").write_text(json.dumps({"step": curve[-1][0], METRIC: curve[-1][1], **cost}))
        for step, value in curve:
            ckpt = run.path / "checkpoints" / f"step_{step}"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "dis_rank0.pt").write_bytes(b"")
            (ckpt / "dis_rank1.pt").write_bytes(b"")
            if step != curve[-1][0]:  # as the trainer: the final checkpoint is written before the final evaluation
                (ckpt / "metrics.json").write_text(json.dumps({METRIC: value}))
        (run.path / "checkpoints" / "latest").write_text(f"step_{curve[-1][0]}")
        return 0

    def test(self, run, checkpoint: Path, out: Path, *, log: Path) -> int:
        self.tested.append((run.path.name, checkpoint.name))
        out.mkdir(parents=True, exist_ok=True)
        step = int(checkpoint.name.split("_")[1])
        (out / "metrics.json").write_text(json.dumps({"checkpoint": str(checkpoint),
                                                      "metrics": {METRIC: self.tests[(run.path.name, step)]}}))
        return 0


# a-lr0.001: better on test (0.9), worse on validation (best 0.6); a-lr0.01 wins on validation at
# step 2 (0.8), then collapses (0.3 at step 4), where its test value would have been better (0.95).
CURVES = {
    "a-lr0.001-s0": [(2, 0.5), (4, 0.6)],
    "a-lr0.01-s0": [(2, 0.8), (4, 0.3)],
    "a-lr0.01-s1": [(2, 0.7), (4, 0.75)],
    "a-lr0.01-s2": [(2, 0.78), (4, 0.77)],
    "b-s0": [(2, 0.2), (4, 0.3)],
    "b-s1": [(2, 0.25), (4, 0.35)],
    "b-s2": [(2, 0.3), (4, 0.2)],
}
TESTS = {("a-lr0.001-s0", 4): 0.9, ("a-lr0.01-s0", 2): 0.4, ("a-lr0.01-s0", 4): 0.95, ("a-lr0.01-s1", 4): 0.5,
         ("a-lr0.01-s2", 2): 0.99, ("a-lr0.01-s2", 4): 0.6, ("b-s0", 4): 0.1, ("b-s1", 4): 0.2, ("b-s2", 2): 0.3}


def test_selection_by_validation_never_by_test(tmp_path, registry):
    path = write_study(tmp_path, TWO_ARMS)
    runner = PlantedRunner(registry, CURVES, TESTS)
    st.run_study(path, out=tmp_path / "out", threads=1, runner=runner, registry=registry, echo=lambda _: None)
    # the grid on seed 0, then seeds 1 and 2 only at a's validation choice (lr 1e-2)
    assert sorted(runner.trained) == sorted(CURVES)
    # the test split is read once per run at the chosen point, from its best-validation checkpoint
    assert sorted(runner.tested) == [("a-lr0.01-s0", "step_2"), ("a-lr0.01-s1", "step_4"), ("a-lr0.01-s2", "step_2"),
                                     ("b-s0", "step_4"), ("b-s1", "step_4"), ("b-s2", "step_2")]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    a, b = report["arms"]
    assert a["chosen"] == "train.optimizer.config.lr=0.01" and b["chosen"] == "(no grid)"
    assert [x["test"] for x in a["runs"]] == [0.4, 0.5, 0.99]  # not 0.9 (lr 1e-3) nor 0.95 (a-lr0.01-s0 at step 4)
    assert a["edges"] == ["train.optimizer.config.lr = 0.01 is the largest value of the grid"]
    # the report: t-intervals over seeds, paired differences by seed
    half = 4.302652729911275 * statistics.stdev([0.4, 0.5, 0.99]) / math.sqrt(3)
    assert a["test"]["n"] == 3 and a["test"]["mean"] == pytest.approx(statistics.fmean([0.4, 0.5, 0.99]))
    assert (a["test"]["low"], a["test"]["high"]) == pytest.approx((a["test"]["mean"] - half, a["test"]["mean"] + half))
    [pair] = report["paired"]
    assert (pair["first"], pair["second"], pair["seeds"]) == ("a", "b", [0, 1, 2])
    assert pair["differences"] == pytest.approx([0.3, 0.3, 0.69]) and pair["low"] < pair["mean"] < pair["high"]
    # collapse: last validation below the best by more than the arm's spread (stdev of 0.8, 0.75, 0.78)
    assert a["spread"] == pytest.approx(statistics.stdev([0.8, 0.75, 0.78]))
    assert [x["collapse"]["flagged"] for x in a["runs"]] == [True, False, False]
    assert [x["collapse"]["flagged"] for x in b["runs"]] == [False, False, True]  # 0.3 -> 0.2: more than b's spread (0.029)
    # costs: device-hours = wall x processes; parameters with the puzzle table (float32 rows)
    assert a["cost_per_run"]["device_hours"] == pytest.approx(36 * 2 / 3600)
    assert (a["params"], a["params_with_puzzle_table"], a["tuning_total"]["runs"]) == (1000, 1100, 4)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**collapsed** (0.500)" in md and "95% interval" in md and "a - b" in md and "| a | 0 | 0.800 (2) |" in md
    assert (tmp_path / "out" / "report.png").stat().st_size > 5000

    # a second invocation trains and evaluates nothing: every run is finished and tested
    again = PlantedRunner(registry, CURVES, TESTS)
    st.run_study(path, out=tmp_path / "out", threads=1, runner=again, registry=registry, echo=lambda _: None)
    assert again.trained == [] and again.tested == []


def test_a_diverged_grid_point_is_never_chosen_nor_retried(tmp_path, registry):
    path = write_study(tmp_path, TWO_ARMS.replace("seeds = [0, 1, 2]", "seeds = [0]"))
    runner = PlantedRunner(registry, CURVES, TESTS, rc={"a-lr0.01-s0": 3})
    st.run_study(path, out=tmp_path / "out", threads=1, runner=runner, registry=registry, echo=lambda _: None)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["arms"][0]["chosen"] == "train.optimizer.config.lr=0.001"
    assert [row["status"] for row in report["arms"][0]["tuning"]] == ["finished", "diverged"]
    again = PlantedRunner(registry, CURVES, TESTS)
    st.run_study(path, out=tmp_path / "out", threads=1, runner=again, registry=registry, echo=lambda _: None)
    assert again.trained == []


def test_a_failed_run_fails_the_study_after_the_report(tmp_path, registry):
    path = write_study(tmp_path, TWO_ARMS.replace("seeds = [0, 1, 2]", "seeds = [0]"))
    runner = PlantedRunner(registry, CURVES, TESTS, rc={"b-s0": 2})
    with pytest.raises(st.UserError, match=r"2 job\(s\) failed .*report.md:\n  - b-s0: exit status 2.*\n  - arm b: no grid point"):
        st.run_study(path, out=tmp_path / "out", threads=1, runner=runner, registry=registry, echo=lambda _: None)
    assert (tmp_path / "out" / "report.md").is_file()
    retry = PlantedRunner(registry, CURVES, TESTS)  # the next invocation resumes it, and only it
    st.run_study(path, out=tmp_path / "out", threads=1, runner=retry, registry=registry, echo=lambda _: None)
    assert retry.trained == retry.resumed == ["b-s0"] and retry.tested == [("b-s0", "step_4")]


def test_a_run_directory_of_another_plan_is_refused(tmp_path, registry):
    path = write_study(tmp_path, TWO_ARMS.replace("seeds = [0, 1, 2]", "seeds = [0]"))
    st.run_study(path, out=tmp_path / "out", threads=1, runner=PlantedRunner(registry, CURVES, TESTS), registry=registry,
                 echo=lambda _: None)
    path.write_text(path.read_text().replace("train.steps=4", "train.steps=5"))
    with pytest.raises(st.StudyError, match=r"b-s0 was made by another plan \(train.steps: was 4, now 5\)"):
        st.run_study(path, out=tmp_path / "out", threads=1, runner=PlantedRunner(registry, CURVES, TESTS),
                     registry=registry, echo=lambda _: None)


def test_dry_run_prints_every_run_and_its_cost_and_trains_nothing(tmp_path, capsys):
    path = write_study(tmp_path, TWO_ARMS)
    assert main(["study", str(path), "--dry-run", "--threads", "1", "--out", str(tmp_path / "out"),
                 "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    runs = [line for line in out.splitlines() if line.startswith("  [new] dis-run ")]
    assert len(runs) == 3  # the grid on seed 0; seeds 1 and 2 wait for the choice
    assert "--set train.optimizer.config.lr=0.01 --set train.steps=4 --set train.eval_interval=2 --set train.seed=0" in runs[1]
    assert "'eval.split=\"valid\"'" in runs[0] and "--set train.threads=1" in runs[0] and "--set train.checkpoint_interval=2" in runs[0]
    assert "then seeds 1, 2 at the chosen point" in out
    assert "per run: 4 optimizer steps, 96 network calls" in out and ">= 16 examples" in out
    assert "total: 7 trainings, 28 optimizer steps" in out


def test_workers_never_oversubscribe_the_cores(tmp_path, capsys, monkeypatch):
    path = write_study(tmp_path, TWO_ARMS)
    monkeypatch.setattr(st.os, "cpu_count", lambda: 4)
    assert main(["study", str(path), "--dry-run", "--workers", "3", "--data-dir", str(tmp_path / "data")]) == 0
    assert "3 at a time with 1 thread(s) each" in capsys.readouterr().out
    assert main(["study", str(path), "--dry-run", "--workers", "2", "--threads", "3"]) == 2
    assert "--workers 2 x 3 thread(s) each is more than this machine's 4 CPU core(s)" in capsys.readouterr().err


def test_a_bad_study_file_is_reported_by_key_path_with_exit_2(tmp_path, capsys):
    path = write_study(tmp_path, """
armz = 3
[[arms]]
name = "a"
recipe = "tiny.toml"
grid = { "train.optimizer.config.lr" = 1e-3 }
""")
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: 2 problem(s) in study {path}" in err
    assert "a grid key takes a non-empty array of values, got 0.001 @ $.arms[0].grid['train.optimizer.config.lr']" in err
    assert "extra fields found (armz) @ $" in err

    path = write_study(tmp_path, """
seeds = [1, 1]
[[arms]]
name = "a b"
recipe = "tiny.toml"
""", "study1.toml")
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err
    assert "seeds must be distinct integers" in err and "@ $.seeds" in err
    assert "name names directories" in err and "@ $.arms[0].name" in err

    path = write_study(tmp_path, """
budget = ["train.steps=4", "nonsense"]
[[arms]]
name = "a"
recipe = "missing.toml"
set = ["train.seed=3"]
grid = { "train.steps" = [1, 2] }
""", "study2.toml")
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err
    assert "recipe file not found: missing.toml" in err and "@ $.arms[0].recipe" in err
    assert "train.seed is set by dis study for every run" in err and "@ $.arms[0].set[0]" in err
    assert "train.steps is fixed for every run by budget[0]" in err and "expected KEY=VALUE" in err and "@ $.budget[1]" in err

    path = write_study(tmp_path, """
budget = ["train.stepz=4"]
[[arms]]
name = "a"
recipe = "tiny.toml"
""", "study3.toml")
    assert main(["study", str(path), "--data-dir", str(tmp_path / "data")]) == 2
    assert "$.arms[0] (arm 'a', recipe tiny.toml): extra fields found (stepz) @ $.train" in capsys.readouterr().err


def test_t_quantiles():
    assert sr.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert sr.t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-3)
    assert sr.t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-3)
    assert sr.t_interval([1.0]) == {"n": 1, "mean": 1.0, "std": None, "low": None, "high": None}


def test_every_committed_study_file_loads_and_its_recipes_resolve(registry):
    from dis_core.wiring.recipe import load_recipe

    files = sorted((ROOT / "studies").glob("*.toml"))
    assert {f.stem for f in files} >= {"nqueens_dis_vs_trm", "sudoku_dis_vs_trm", "nqueens_solver_edits"}
    for f in files:
        study = st.load_study(f)
        assert f"dis study studies/{f.name}" in f.read_text()  # the header gives the command
        for arm in study.spec.arms:
            for values in arm.grid.values():
                for v in values:
                    sets = [*arm.set, f"{next(iter(arm.grid))}={st.toml_value(v)}", *study.spec.budget, 'eval.split="valid"']
                    load_recipe(f.parent / arm.recipe, registry, sets)


def test_a_tiny_two_arm_study_end_to_end(tmp_path, registry):
    """Two arms, one seed, trained by `dis-run` and tested by `dis eval` subprocesses."""
    path = write_study(tmp_path, """
seeds = [0]
budget = ["train.steps=4", "train.eval_interval=2", "task.config.num_valid=5"]
[[arms]]
name = "dis"
recipe = "tiny.toml"
[[arms]]
name = "trm"
recipe = "tiny.toml"
set = ["targets.name=final", "halting.name=act", "backbone.config.step_embedding=false"]
""")
    out = tmp_path / "out"
    text = st.run_study(path, out=out, threads=1, data_dir=tmp_path / "data", registry=registry, echo=lambda _: None)
    assert "| dis - trm | 1 |" in text
    report = json.loads((out / "report.json").read_text())
    for arm in report["arms"]:
        [run] = arm["runs"]
        assert run["status"] == "finished" and isinstance(run["test"], float) and run["checkpoint"]
        assert arm["test"]["n"] == 1 and arm["test"]["low"] is None
        recipe = json.loads((Path(run["run"]) / "run.json").read_text())["recipe"]
        assert recipe["eval"]["split"] == "valid" and recipe["train"]["keep_best"] == "exact/exact_accuracy"
        rows = [json.loads(line) for line in (Path(run["run"]) / "metrics.jsonl").read_text().splitlines()]
        assert [r["exact/count"] for r in rows if r["split"] == "eval"] == [5.0, 5.0]  # the validation split
        test = json.loads((Path(run["run"]) / sr.TEST_DIR / "metrics.json").read_text())
        assert test["metrics"]["exact/count"] == 12.0  # the test split
        assert Path(test["checkpoint"]).resolve() == Path(run["checkpoint"]).resolve()
    assert (out / "logs" / "dis-s0.log").read_text().startswith("$ dis-run ")
    # `dis eval --split valid` reads the validation split (5 boards), as the training evaluations did
    ckpt = report["arms"][0]["runs"][0]["checkpoint"]
    assert main(["eval", ckpt, "--split", "valid", "--out", str(tmp_path / "ev"), "--data-dir", str(tmp_path / "data")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]["exact/count"] == 5.0

    class Refuse:
        def train(self, *a, **k):
            raise AssertionError("a finished run was trained again")

        test = train

    st.run_study(path, out=out, threads=1, data_dir=tmp_path / "data", registry=registry, runner=Refuse(), echo=lambda _: None)


def test_the_old_study_script_is_gone_and_the_pages_say_which_study_makes_them():
    assert not (ROOT / "benchmarks" / "study.py").exists()
    for p in [*ROOT.glob("docs/**/*.md"), *ROOT.glob("*.md"), *ROOT.glob("recipes/*.toml"), *ROOT.glob("benchmarks/*.py")]:
        assert "python benchmarks/study.py" not in p.read_text(), p  # no command runs it any more
    for page, study in [("nqueens_cpu", "nqueens_dis_vs_trm"), ("sudoku_cpu", "sudoku_dis_vs_trm"),
                        ("nqueens_solver_edits", "nqueens_solver_edits"), ("arc_cpu", "arc1_cpu_dis_vs_trm")]:
        assert f"Reproduce: `dis study studies/{study}.toml" in (ROOT / "docs" / "results" / f"{page}.md").read_text()


def test_the_subprocess_runner_commands(tmp_path):
    runner = st.SubprocessRunner(threads=2, data_dir=tmp_path / "data", cwd=tmp_path)
    run = st.RunSpec(arm="a", point=st.Point(0, ()), seed=0, path=tmp_path / "a-s0", recipe=tmp_path / "r.toml",
                     overrides=("train.seed=0",))
    cmd = runner.train_command(run, resume=True)
    assert cmd[:4] == [sys.executable, "-m", "dis_core.cli", "run"] and cmd[-1] == "--resume"
    assert st.shown_command(cmd).startswith(f"dis-run {tmp_path / 'r.toml'} --set train.seed=0 --out ")
    test = runner.test_command(run, tmp_path / "a-s0" / "checkpoints" / "step_2", tmp_path / "t")
    assert st.shown_command(test).startswith("dis eval ") and "--split test" in st.shown_command(test)


def test_toml_values_survive_the_override_parser():
    from dis_core.wiring.recipe import parse_override

    for value in [3e-3, 1e-05, 7, True, "a b", 'q"uote', [1, 2.5], {"x": "y", "n": 1}, float("inf")]:
        assert parse_override(f"k={st.toml_value(value)}")[1] == value
