"""The preflight (issue 19): before the first step a run states its work, memory and time,
stops with exit 2 when it cannot fit (naming the fix), and "auto" picks the micro-batch that
fits; checkpoints by wall time; a micro-batch that changes on --resume; progress a person reads.

Where a test needs the preflight's decision to be exact, the probe's measurement is replaced by
fixed figures (`_fixed_probe`): measured memory and time vary from machine to machine and with
what else runs, and are only checked for being sane."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest

from dis_core.contract.logs import clock, in_words, progress
from dis_core.loop import pace, preflight
from dis_core.loop.probe import Linear, Probe, parse_bytes
from dis_core.loop.trainer import Trainer
from dis_core.outputs import rundir
from dis_core.step.solver import Solver
from dis_core.tools.cli import main
from dis_core.wiring.recipe import load_recipe

from conftest import tiny_recipe

MiB = 2**20


def _plan(tmp_path, registry, overrides=()):
    resolved = load_recipe(tiny_recipe(tmp_path), registry, list(overrides))
    return preflight.plan(resolved, Solver.build(resolved, registry, tmp_path / "data"))


def _run(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if r["split"] == "train"]


def _fixed_probe(monkeypatch, *, available_mib: float, per_slot_mib: float = 100, eval_per_example_mib: float = 10,
                 seconds_per_slot: float = 1e-3):
    """The probe measures these figures, the process holds 1 GiB once built and `available_mib`
    are available. With the tiny recipe (8 slots) a micro-batch of m needs
    1024 + 1 + 8 + (16 if m < 8) + per_slot_mib * m MiB."""
    fixed = Probe(train=Linear(fixed=0, per_slot=per_slot_mib * MiB), evaluation=Linear(fixed=0, per_slot=eval_per_example_mib * MiB),
                  outputs_per_slot=MiB, carry_per_slot=MiB, evaluator_per_example=0, optimizer=MiB,
                  train_s_per_slot=seconds_per_slot, timed_slots=8, optimizer_s=0.0, refill_s_per_example=0.0,
                  eval_s_per_example=seconds_per_slot, seconds=0.01)
    monkeypatch.setattr(preflight, "probe", lambda solver, **_: fixed)
    monkeypatch.setattr(preflight, "resident_bytes", lambda: 1024 * MiB)
    monkeypatch.setattr(preflight, "available_memory", lambda device, **_: (int(available_mib * MiB), "a test limit"))


# ------------------------------------------------------------------ 1. the figures


def test_the_preflight_figures_of_a_tiny_recipe(tmp_path, registry):
    pf = _plan(tmp_path, registry, ["train.eval_interval=4"])
    assert pf.steps == 6 and pf.global_batch == 8 and pf.micro_batch == 8 and pf.accumulation == 1
    assert pf.examples == math.ceil(6 * 8 / 3) and pf.train_examples == 360  # n_sup 3; 40 boards x 9 variants
    assert pf.evaluations == 2 and pf.eval_examples == 12  # at step 4 and the final one
    assert pf.problem is None and pf.available > pf.needed > pf.memory["built"] > 0
    m = pf.memory
    assert m["activations"] > 0 and m["activations_per_slot"] > 0 and m["optimizer"] > 0 and m["model"] > 0
    assert m["training_peak"] == pf.needed >= m["evaluation_peak"] or m["evaluation_peak"] == pf.needed
    s = pf.seconds
    assert 0 < s["step"] < 60 and s["total"] == pytest.approx(s["train"] + s["evaluation"]) and math.isfinite(s["total"])
    assert s["train"] == pytest.approx(6 * s["step"])
    assert pf.gpus is None and pf.note is None  # not ARC; far less than a day


def test_memory_grows_with_the_micro_batch(tmp_path, registry):
    small = _plan(tmp_path, registry, ["train.micro_batch_size=2"])
    whole = _plan(tmp_path, registry)
    assert small.micro_batch == 2 and small.accumulation == 4 and whole.micro_batch == 8
    assert 0 < small.memory["activations"] < whole.memory["activations"]
    assert small.memory["activations_per_slot"] > 0


def test_epochs_give_the_steps_and_examples(tmp_path, registry):
    pf = _plan(tmp_path, registry, ["train.epochs=2"])
    assert pf.steps == math.ceil(2 * 360 * 3 / 8) and pf.examples == math.ceil(pf.steps * 8 / 3)


def test_without_the_probe_only_the_work_is_given(tmp_path, registry):
    pf = _plan(tmp_path, registry, ["train.preflight=false"])
    assert pf.steps == 6 and pf.memory == {} and pf.seconds == {} and pf.needed is None and pf.problem is None
    assert any("not measured (train.preflight = false)" in line for line in preflight.report(pf))


def test_auto_needs_the_preflight(tmp_path, capsys):
    code, _, err = _run(["run", tiny_recipe(tmp_path), "--dry-run", "--set", "train.micro_batch_size=auto",
                         "--set", "train.preflight=false"], capsys)
    assert code == 2 and 'micro_batch_size = "auto" needs train.preflight = true' in err and "Traceback" not in err


def test_the_probe_changes_nothing_the_run_trains(tmp_path, registry):
    runs = {}
    for name, extra in (("with", []), ("without", ["train.preflight=false"])):
        resolved = load_recipe(tiny_recipe(tmp_path), registry, ["train.steps=5", *extra])
        Trainer(resolved, registry, tmp_path / name, data_dir=tmp_path / "data").fit(registry)
        runs[name] = _losses(tmp_path / name)
    assert runs["with"] == runs["without"]


# ------------------------------------------------------------------ 2. a run that cannot fit


def test_a_run_that_cannot_fit_stops_before_its_first_step(tmp_path, capsys, monkeypatch):
    _fixed_probe(monkeypatch, available_mib=1625)  # 2 slots fit (1249 x 1.25 MiB), 4 do not (1449 x 1.25)

    def no_step(self):
        raise AssertionError("a step ran")

    monkeypatch.setattr(Trainer, "train_step", no_step)
    out = tmp_path / "run"
    code, _, err = _run(["run", tiny_recipe(tmp_path), "--out", out, "--data-dir", tmp_path / "data"], capsys)
    assert code == 2 and "Traceback" not in err
    message = err[err.index("error: "):]
    assert "needs about 1.8 GiB per process" in message and "1.6 GiB are available (a test limit" in message
    assert "--set train.micro_batch_size=2" in message and '"auto"' in message
    assert not out.exists()  # nothing was written: no empty run directory is left behind
    assert "stop        the run needs" in err  # the preflight's own lines say it too


def test_evaluation_that_cannot_fit_names_the_evaluation_batch(tmp_path, capsys, monkeypatch):
    _fixed_probe(monkeypatch, available_mib=1625, eval_per_example_mib=200)
    code, _, err = _run(["run", tiny_recipe(tmp_path), "--out", tmp_path / "run", "--data-dir", tmp_path / "data",
                         "--set", "train.micro_batch_size=2"], capsys)
    assert code == 2 and "--set train.eval_batch_size=1 (evaluation batches" in err
    assert "micro_batch_size=" not in err[err.index("error: "):]  # the training step fits as it is


def test_a_run_that_fits_nowhere_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIS_MEMORY_LIMIT", "1MB")  # the real probe, against less than the process holds
    code, _, err = _run(["run", tiny_recipe(tmp_path), "--out", tmp_path / "run", "--data-dir", tmp_path / "data"], capsys)
    assert code == 2 and "available (DIS_MEMORY_LIMIT" in err and "does not fit even one slot at a time" in err


def test_a_probe_that_fails_leaves_the_run_to_fail_where_it_would(tmp_path, registry, monkeypatch):
    from dis_core.loop import probe

    def broken(*args, **kwargs):
        raise ValueError("a component's bug")

    monkeypatch.setattr(probe, "_train_step", broken)
    pf = _plan(tmp_path, registry, ["train.micro_batch_size=auto"])
    assert pf.unmeasured == "the probe step failed: ValueError: a component's bug" and pf.memory == {}
    assert pf.problem is None and pf.micro_batch == 8  # "auto" without a measurement: the whole share
    assert any("not measured (the probe step failed" in line for line in preflight.report(pf))


def test_memory_sizes_are_read_as_people_write_them():
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("500 MB") == 500 * MiB and parse_bytes("123") == 123
    with pytest.raises(Exception, match="DIS_MEMORY_LIMIT='lots'"):
        parse_bytes("lots")


# ------------------------------------------------------------------ 3. micro_batch_size = "auto"


def test_auto_picks_the_largest_divisor_that_fits_and_trains_the_same(tmp_path, registry, capsys, monkeypatch):
    _fixed_probe(monkeypatch, available_mib=1625)
    common = ["--data-dir", tmp_path / "data", "--set", "train.precision=fp32", "--set", "train.steps=6"]
    code, _, err = _run(["run", tiny_recipe(tmp_path), "--out", tmp_path / "auto", *common, "--set", "train.micro_batch_size=auto"], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "auto" / "run.json").read_text())["preflight"]
    assert info["micro_batch_setting"] == "auto" and info["micro_batch"] == 2 and info["accumulation"] == 4
    assert info["available"] == 1625 * MiB and info["memory"]["activations"] == 200 * MiB
    code, _, err = _run(["run", tiny_recipe(tmp_path), "--out", tmp_path / "two", *common, "--set", "train.micro_batch_size=2"], capsys)
    assert code == 0, err
    assert _losses(tmp_path / "auto") == _losses(tmp_path / "two")  # the same run exactly
    monkeypatch.setattr(preflight, "available_memory", lambda device, **_: (None, "unknown"))
    code, _, err = _run(["run", tiny_recipe(tmp_path), "--out", tmp_path / "whole", *common], capsys)
    assert code == 0, err
    for (s1, l1), (s2, l2) in zip(_losses(tmp_path / "auto"), _losses(tmp_path / "whole"), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)  # accumulation: fp32 rounding only


def test_auto_sizes_evaluation_too(tmp_path, registry, monkeypatch):
    _fixed_probe(monkeypatch, available_mib=1625, eval_per_example_mib=200)
    pf = _plan(tmp_path, registry, ["train.micro_batch_size=auto"])
    assert pf.problem is None and pf.micro_batch == 2 and pf.eval_batch == 1


# ------------------------------------------------------------------ 4. checkpoints by time


def test_checkpoints_come_by_wall_time(tmp_path, registry, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(pace, "now", lambda: now[0])
    train_step = Trainer.train_step

    def step_of_0_6_s(self):
        now[0] += 0.6
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_of_0_6_s)
    resolved = load_recipe(tiny_recipe(tmp_path), registry, ["train.checkpoint_every=1s", "train.keep_checkpoints=0"])
    Trainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data").fit(registry)
    # 1.2 s after step 2, again 1.2 s after step 4; the end writes step 6 anyway.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_2", "step_4", "step_6"]


@pytest.mark.parametrize("value, message", [
    ('"30 minutes"', 'expected a duration such as "90s", "30m", "2h" or "1h30m", or "off"'),
    ("1800", 'expected a duration string such as "30m" (in seconds: "1800s")'),
    ('"0s"', 'a duration must be longer than 0 (use "off" to turn it off)'),
])
def test_a_bad_checkpoint_time_is_a_recipe_error(tmp_path, capsys, value, message):
    code, _, err = _run(["run", tiny_recipe(tmp_path), "--dry-run", "--set", f"train.checkpoint_every={value}"], capsys)
    assert code == 2 and message in err and "@ $.train.checkpoint_every" in err and "Traceback" not in err


def test_checkpoint_times_as_people_write_them(tmp_path, registry):
    from dis_core.wiring.recipe import parse_duration

    assert [parse_duration(t) for t in ("90s", "30m", "2h", "1h30m", "off")] == [90, 1800, 7200, 5400, None]
    assert load_recipe(tiny_recipe(tmp_path), registry).recipe.train.checkpoint_every == "30m"  # the default


# ------------------------------------------------------------------ 5. resuming with another micro-batch


def test_resume_with_another_micro_batch_continues_the_same_training(tmp_path, registry, capsys):
    common = ["train.steps=10", "train.checkpoint_interval=4", "train.precision=fp32"]
    recipe = tiny_recipe(tmp_path)
    sets = [a for s in common for a in ("--set", s)]
    assert main(["run", str(recipe), "--out", str(tmp_path / "full"), "--data-dir", str(tmp_path / "data"), *sets]) == 0
    # A run stopped after step 6; its newest checkpoint is step 4.
    Trainer(load_recipe(recipe, registry, common), registry, tmp_path / "cut", data_dir=tmp_path / "data").fit(registry, stop_after=6)
    rundir.release_lock(tmp_path / "cut")
    # It resumes with a smaller micro-batch (the fix after running out of memory), another
    # evaluation batch, thread count and checkpoint time: memory and speed, not the training.
    code, _, err = _run(["run", recipe, "--out", tmp_path / "cut", "--resume", "--data-dir", tmp_path / "data", *sets,
                         "--set", "train.micro_batch_size=2", "--set", "train.eval_batch_size=4", "--set", "train.threads=1",
                         "--set", "train.checkpoint_every=1h"], capsys)
    assert code == 0, err
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [s for s, _ in cut] == list(range(1, 11))
    assert full[:4] == cut[:4]  # before the checkpoint: the very rows of the first session
    for (s1, l1), (s2, l2) in zip(full[4:], cut[4:], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)  # accumulation: fp32 rounding only
    # What the run trains still may not change.
    code, _, err = _run(["run", recipe, "--out", tmp_path / "cut", "--resume", "--data-dir", tmp_path / "data", *sets,
                         "--set", "train.global_batch_size=4"], capsys)
    assert code == 2 and "train.global_batch_size: was 8, now 4" in err


# ------------------------------------------------------------------ 6. progress a person reads


def test_durations_past_a_day_read_in_days_and_years():
    assert clock(348.8) == "05:48" and clock(3 * 3600 + 5) == "3:00:05" and clock(86399) == "23:59:59"
    assert clock(86400 * 6 + 7 * 3600 + 120) == "6 d 07 h" and clock(30 * 3600) == "1 d 06 h"
    assert clock(150934 * 3600 + 32 * 60) == "17.2 years" and clock(float("nan")) == "?"
    assert in_words(17.2 * 365.25 * 86400) == "about 17 years" and in_words(40 * 3600) == "about 40 h"
    assert in_words(5 * 86400) == "about 5.0 days" and in_words(600) == "about 10 minutes" and in_words(30) == "about 30 s"


def test_the_bar_shows_a_long_eta_in_days(capsys):
    bar = progress(1557811, "train", rank=0, unit="step")
    bar.eta_s = lambda: 30 * 3600.0
    bar.update(1)
    bar.refresh()
    bar.eta_s = lambda: 150934 * 3600.0
    bar.refresh()
    bar.close()
    err = capsys.readouterr().err
    assert "<1 d 06 h," in err and "<17.2 years," in err and "150934" not in err


def test_training_shows_examples_per_second_and_the_evaluation_share(tmp_path, capsys):
    code, _, err = _run(["run", tiny_recipe(tmp_path), "--out", tmp_path / "run", "--data-dir", tmp_path / "data",
                         "--set", "train.eval_interval=2"], capsys)
    assert code == 0, err
    last = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("train:") and "6/6" in line][-1]
    assert "examples/s=" in last and "eval=" in last and "loss=" in last


def test_a_run_of_more_than_a_day_on_a_cpu_names_the_recipe_for_it(tmp_path, registry, monkeypatch):
    _fixed_probe(monkeypatch, available_mib=10**6, seconds_per_slot=3600.0)
    pf = _plan(tmp_path, registry)
    # 6 steps x 8 slots and 12 test examples, an hour each
    assert pf.note == "about 2.5 days on this CPU: the recipe is meant for GPUs; on this machine use a CPU-sized recipe (nqueens_quick.toml)"
    arc = types.SimpleNamespace(source=str(tmp_path / "arc1_compact.toml"), recipe=types.SimpleNamespace(task=types.SimpleNamespace(name="arc")))
    assert preflight.cpu_recipe(arc) == "a CPU-sized ARC recipe"
    (tmp_path / "arc1_cpu.toml").write_text("")
    assert preflight.cpu_recipe(arc) == str(tmp_path / "arc1_cpu.toml")


def test_without_a_preflight_the_pace_of_the_first_steps_says_it_once(tmp_path, registry, monkeypatch):
    from structlog.testing import capture_logs

    now = [0.0]
    monkeypatch.setattr(pace, "now", lambda: now[0])
    train_step = Trainer.train_step

    def an_hour_a_step(self):
        now[0] += 3600.0
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", an_hour_a_step)
    resolved = load_recipe(tiny_recipe(tmp_path), registry, ["train.steps=40", "train.preflight=false", "train.checkpoint_every=off"])
    with capture_logs() as logs:
        Trainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data").fit(registry)
    said = [e["event"] for e in logs if "on this CPU" in e["event"]]
    assert said == ["about 37 h to go on this CPU: the recipe is meant for GPUs; on this machine use a CPU-sized recipe "
                    "(nqueens_quick.toml)"]


# ------------------------------------------------------------------ 7. --dry-run and GPUs on paper


def test_dry_run_prints_the_preflight(tmp_path, capsys):
    code, out, _ = _run(["run", tiny_recipe(tmp_path), "--dry-run", "--data-dir", tmp_path / "data"], capsys)
    assert code == 0
    section = out[out.index("# preflight"):]
    for start in ("work        6 optimizer steps x 8 slots: 16 examples", "memory      needs ", "available   ", "time        about "):
        assert start in section
    code, out, _ = _run(["run", tiny_recipe(tmp_path), "--dry-run", "--json", "--data-dir", tmp_path / "data"], capsys)
    found = json.loads(out)["preflight"]
    assert code == 0 and found["steps"] == 6 and found["micro_batch"] == 8 and found["needed"] > 0 and found["seconds"]["total"] > 0


def test_gpu_estimates_scale_the_published_figures():
    compact, trm = preflight.PUBLISHED
    assert preflight.nearest_anchor(2.4e9) is compact and preflight.nearest_anchor(1.6e10) is trm
    # arc1_cpu's D 64 network on 101 positions: no published run near enough to scale from
    assert preflight.nearest_anchor(3e7) is None and preflight.nearest_anchor(2.42e9 / 5) is None
    found = preflight._gpus(compact, compact.flops / 2, None, batch=512, fixed=0)
    assert found["hours"] == {1: pytest.approx(80.0), 4: pytest.approx(20.0), 8: pytest.approx(10.0)}
    assert list(preflight._gpus(compact, compact.flops, None, batch=4, fixed=0)["hours"]) == [1, 4]  # 8 GPUs cannot split 4 slots
    assert found["anchor"] == "arc1_compact: 40 h on 4 H100, the DIS paper"


def test_the_time_line_says_what_the_probe_cannot_see(tmp_path, registry, monkeypatch):
    """An eager probe of a compiled run, and a probe on a CPU others keep busy, both read long:
    the preflight says so under its time line instead of presenting the figure as exact."""
    monkeypatch.setattr(preflight, "busy_cpu", lambda: None)
    quiet = _plan(tmp_path, registry)
    assert quiet.caveats == [] and not any(line.startswith("            (") for line in preflight.report(quiet))
    compiled = _plan(tmp_path, registry, ["train.compile=true"])
    assert len(compiled.caveats) == 1 and "probe ran eager" in compiled.caveats[0]
    assert any("train.compile" in line for line in preflight.report(compiled))
    monkeypatch.undo()
    assert preflight.busy_cpu(cores=2, load=2.4) is None  # a probe's own thread on a quiet 2-core machine
    busy = preflight.busy_cpu(cores=2, load=5.5)
    assert busy is not None and "load 5.5 on 2 core(s)" in busy
    monkeypatch.setattr(preflight, "busy_cpu", lambda: busy)
    loaded = _plan(tmp_path, registry)
    assert loaded.caveats == [busy] and f"            ({busy})" in preflight.report(loaded)
