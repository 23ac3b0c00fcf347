"""Faults and hostile-but-fair input (issue 13): each is answered with one clear message and the
right exit status (2: the user or the environment must act; 3: training diverged), nothing
already written is lost or duplicated, temporary files are removed.

Fast, in-process checks; the ones that kill processes are in test_faults.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from dis_core.loop import checkpoint, guards
from dis_core import hookimpl
from dis_core.outputs import rundir
from dis_core.wiring.build import build_components
from dis_core.tools.cli import main
from dis_core.contract.errors import CheckpointError, PluginError, RunDiverged
from dis_core.wiring.plugins import load_registry
from dis_core.wiring.recipe import load_recipe
from dis_core.loop.checkpoint import params_digest
from dis_core.loop.trainer import Trainer

from conftest import ROOT, subprocess_env, tiny_recipe


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in _rows(run) if r["split"] == "train"]


def _trainer(tmp_path, registry, out, overrides=(), resume=False, recipe=None):
    resolved = load_recipe(recipe or tiny_recipe(tmp_path), registry, list(overrides))
    return Trainer(resolved, registry, out, data_dir=tmp_path / "data", resume=resume)


def _poison_logits_at(trainer: Trainer, step: int) -> None:
    """Make the training forward of optimizer step `step` return NaN logits (a fault injected at
    a chosen step; the Backbone protocol fixes the output's structure)."""

    def hook(module, args, out):
        if module.training and trainer.state.step == step:
            (y, z), logits, q = out
            return (y, z), logits * float("nan"), q
        return None

    trainer.solver.backbone.register_forward_hook(hook)


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ 1. divergence


def test_nan_at_a_chosen_step_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path, registry):
    out = tmp_path / "run"
    trainer = _trainer(tmp_path, registry, out, ["train.checkpoint_interval=2", "train.steps=8"])
    _poison_logits_at(trainer, 5)
    with pytest.raises(RunDiverged, match=r"step 5: training diverged: loss nan") as info:
        trainer.fit(registry)
    assert "step_4" in str(info.value) and "train.on_nonfinite" in str(info.value)
    ckpts = out / "checkpoints"
    assert checkpoint.find_latest(ckpts, 1) == "step_4" and not (ckpts / "step_6").exists()
    assert not list(ckpts.glob(".tmp-*"))
    # The weights in memory are those of step 4's update: the bad step changed nothing.
    saved = torch.load(next((ckpts / "step_4").glob("*model_states.pt")), weights_only=False)["module"]
    live = trainer.engine.module.state_dict()
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4]  # no row for the diverged step


def test_divergence_exits_3_with_a_clear_message(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    code, err = _run(["run", str(recipe), "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
                      "--set", "train.optimizer.config.lr=1e9", "--set", "train.checkpoint_interval=1"], capsys)
    assert code == 3, err
    assert "training diverged" in err and "Traceback" not in err
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    state = torch.load(next((tmp_path / "run" / "checkpoints" / latest).glob("*model_states.pt")), weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["module"].values() if t.is_floating_point())


def test_skip_drops_the_update_and_goes_on(tmp_path, registry):
    out = tmp_path / "run"
    trainer = _trainer(tmp_path, registry, out, ["train.on_nonfinite=skip", "train.steps=6"])
    _poison_logits_at(trainer, 3)
    seen = {}
    check = trainer.guard.check_step

    def spy(step, loss, params):
        seen[step] = params_digest(trainer.engine.module)  # the weights the step starts from
        return check(step, loss, params)

    trainer.guard.check_step = spy
    with capture_logs() as logs:
        summary = trainer.fit(registry)
    assert summary["step"] == 6 and trainer.guard.skipped == 1
    assert seen[3] == seen[4] != seen[2]  # step 3's update was dropped, the others applied
    assert any(e["event"].startswith("non-finite step skipped") and e["step"] == 3 for e in logs)
    losses = dict(_losses(out))
    assert np.isnan(losses[3]) and all(np.isfinite(v) for s, v in losses.items() if s != 3)


def test_skip_gives_up_after_many_in_a_row(tmp_path, registry, monkeypatch):
    monkeypatch.setattr(guards, "MAX_CONSECUTIVE_SKIPS", 2)
    trainer = _trainer(tmp_path, registry, tmp_path / "run", ["train.on_nonfinite=skip", "train.optimizer.config.lr=1e9"])
    with pytest.raises(RunDiverged, match="non-finite steps in a row"):
        trainer.fit(registry)


def test_nonfinite_weights_are_never_checkpointed(tmp_path, registry):
    out = tmp_path / "run"
    trainer = _trainer(tmp_path, registry, out, ["train.steps=2"])
    trainer.fit(registry)
    with torch.no_grad():
        next(trainer.engine.module.parameters()).view(-1)[0] = float("inf")
    trainer.state.step = 3
    with pytest.raises(RunDiverged, match="not writing a checkpoint: non-finite values in backbone"):
        trainer.save_checkpoint()
    assert checkpoint.find_latest(out / "checkpoints", 1) == "step_2" and not (out / "checkpoints" / "step_3").exists()


# ------------------------------------------------------------------ 2. one run per directory


def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; from pathlib import Path; from dis_core.outputs.rundir import acquire_lock; "
                               f"acquire_lock(Path({str(out)!r}), 'holder'); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(PYTHONPATH=str(ROOT)),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = _run(["run", str(tiny_recipe(tmp_path)), "--out", str(out), "--data-dir", str(tmp_path / "data")], capsys)
        assert code == 2 and "is in use by another run" in err and f"pid {holder.pid}" in err and "Traceback" not in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, whatever state the holder was in
        holder.wait()
    code, err = _run(["run", str(tiny_recipe(tmp_path, steps=2)), "--out", str(out), "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 0, err
    assert out.resolve() not in rundir._held, "the CLI releases the lock when it ends"


# ------------------------------------------------------------------ 3. plugins


def _fake_dist(site: Path, name: str, version: str, entry_points: str, modules: dict[str, str] | None = None) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[dis]\n" + entry_points)
    for mod, code in (modules or {}).items():
        (site / f"{mod}.py").write_text(textwrap.dedent(code))


@pytest.fixture
def broken_site(tmp_path, monkeypatch):
    """Three installed plugins that fail in three ways: import, registration, a misspelled hook."""
    site = tmp_path / "site"
    _fake_dist(site, "dis-ghost", "0.1", "ghost = ghost_plugin_missing\n")
    _fake_dist(site, "dis-badreg", "0.2", "badreg = badreg_plugin\n", {"badreg_plugin": """
        from dis_core import hookimpl
        @hookimpl
        def register_tasks(register):
            raise RuntimeError("cannot reach the data server")
    """})
    _fake_dist(site, "dis-typo", "0.3", "typo = typo_plugin\n", {"typo_plugin": """
        from dis_core import hookimpl
        @hookimpl
        def register_backbone(register):
            pass
    """})
    monkeypatch.syspath_prepend(str(site))
    return site


def test_broken_plugins_are_named_and_the_rest_still_work(broken_site, tmp_path, capsys):
    registry = load_registry()
    broken = {b.name: b for b in registry.broken}
    assert set(broken) == {"ghost", "badreg", "typo"}
    assert broken["ghost"].entry_point == "ghost = ghost_plugin_missing" and broken["ghost"].distribution == "dis-ghost 0.1"
    assert "ModuleNotFoundError" in broken["ghost"].error
    assert "cannot reach the data server" in broken["badreg"].error and "register_backbone" in broken["typo"].error
    assert ("backbone", "trm") in registry  # the builtins are untouched

    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    assert "reveal_path" in captured.out and "BROKEN" in captured.out and "ghost" in captured.out
    assert "entry point `ghost = ghost_plugin_missing` of distribution dis-ghost 0.1" in captured.err
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["plugin"] for r in rows if r.get("broken")} == {"ghost", "badreg", "typo"}

    # A recipe that does not need them runs; one naming an unknown component names them.
    recipe = tiny_recipe(tmp_path)
    code, err = _run(["run", str(recipe), "--dry-run", "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 0 and "ghost" in err  # a warning, not an error
    recipe.write_text(recipe.read_text().replace('name = "trm"', 'name = "ghostnet"'))
    code, err = _run(["run", str(recipe), "--dry-run"], capsys)
    assert code == 2 and "unknown backbone 'ghostnet'" in err and "Traceback" not in err
    assert "plugin 'ghost' (entry point `ghost = ghost_plugin_missing` of distribution dis-ghost 0.1) failed to load" in err


@attrs.frozen(kw_only=True)
class _NoOptions:
    pass


def test_a_factory_returning_the_wrong_kind_names_plugin_and_component(tmp_path):
    class Wrong:
        @hookimpl
        def register_backbones(self, register):
            register("confused", _NoOptions, lambda config, ctx: config)  # its config, not a backbone

    registry = load_registry(extra_plugins=(Wrong(),))
    resolved = load_recipe(tiny_recipe(tmp_path), registry, ["backbone.name=confused"])
    with pytest.raises(PluginError) as info:
        build_components(resolved, registry, tmp_path / "data")
    msg = str(info.value)
    assert "the factory of backbone 'confused' @ $.backbone returned" in msg and "not a backbone" in msg
    assert "forward" in msg and registry.get("backbone", "confused").plugin in msg


# ------------------------------------------------------------------ 4. resume


def test_resume_skips_a_corrupted_newest_checkpoint(tmp_path, registry):
    extra = ["train.checkpoint_interval=2", "train.steps=8"]
    _trainer(tmp_path, registry, tmp_path / "full", extra).fit(registry)
    _trainer(tmp_path, registry, tmp_path / "killed", extra).fit(registry, stop_after=5)
    ckpts = tmp_path / "killed" / "checkpoints"
    newest = next((ckpts / "step_4").glob("*model_states.pt"))
    newest.write_bytes(newest.read_bytes()[:100])  # cut short, as a failing disk or a copy would
    with (tmp_path / "killed" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "split": "tr')  # and a row torn by the kill
    with capture_logs() as logs:
        trainer = _trainer(tmp_path, registry, tmp_path / "killed", extra, resume=True)
    assert trainer.resumed_from == "step_2"
    assert any(e.get("checkpoint", "").endswith("step_4") and e["log_level"] == "warning" for e in logs)
    trainer.fit(registry)
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")


def test_resume_with_no_loadable_checkpoint_says_so(tmp_path, registry):
    out = tmp_path / "run"
    _trainer(tmp_path, registry, out, ["train.steps=2"]).fit(registry)
    for f in (out / "checkpoints" / "step_2").glob("*model_states.pt"):
        f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of the checkpoints .* can be loaded .*step_2"):
        _trainer(tmp_path, registry, out, ["train.steps=2"], resume=True)


def test_checkpoint_of_another_model_names_the_tensors(tmp_path, registry, capsys):
    recipe = tiny_recipe(tmp_path, steps=2)
    a, b = tmp_path / "a", tmp_path / "b"
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["run", str(recipe), "--out", str(a), *data]) == 0
    assert main(["run", str(recipe), "--out", str(b), *data, "--set", "backbone.config.hidden_size=16"]) == 0
    shutil.rmtree(b / "checkpoints")
    shutil.copytree(a / "checkpoints", b / "checkpoints")  # b's recipe.toml, a's weights
    capsys.readouterr()
    code, err = _run(["run", str(recipe), "--out", str(b), "--resume", *data, "--set", "backbone.config.hidden_size=16",
                      "--set", "train.steps=3"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "was written for another model" in err and "shapes differ" in err and "(checkpoint [" in err and ", model [" in err


def test_a_finished_run_resumed_adds_no_row(tmp_path, capsys):
    recipe, out = tiny_recipe(tmp_path, steps=3), tmp_path / "run"
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["run", str(recipe), "--out", str(out), *data]) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    code, err = _run(["run", str(recipe), "--out", str(out), "--resume", *data], capsys)
    assert code == 0 and "nothing to do" in err
    assert (out / "metrics.jsonl").read_text() == before
    # Killed between the final checkpoint and summary.json: the summary comes from the logged row.
    (out / "summary.json").unlink()
    assert main(["run", str(recipe), "--out", str(out), "--resume", *data]) == 0
    assert (out / "metrics.jsonl").read_text() == before
    assert json.loads((out / "summary.json").read_text())["nqueens/count"] == 12


def test_a_dead_run_without_checkpoint_is_not_mixed_into_a_new_one(tmp_path, capsys):
    recipe, out = tiny_recipe(tmp_path), tmp_path / "run"
    trainer = _trainer(tmp_path, load_registry(), out)
    trainer.fit(load_registry(), stop_after=3)  # killed before its first checkpoint
    rundir.release_lock(out)
    before = (out / "metrics.jsonl").read_text()
    code, err = _run(["run", str(recipe), "--out", str(out), "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 2 and "stopped before its first checkpoint" in err and "metrics up to step 3" in err and "--resume" in err
    assert (out / "metrics.jsonl").read_text() == before  # untouched
    # --resume starts it again from step 0 in place, its rows dropped (tests/test_run_lifecycle.py)
    code, err = _run(["run", str(recipe), "--out", str(out), "--resume", "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 0 and "starts again from step 0" in err
    assert [r["step"] for r in _rows(out) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------ 5. the operating system


def test_out_naming_a_file_and_data_dir_naming_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    recipe = tiny_recipe(tmp_path)
    code, err = _run(["run", str(recipe), "--out", str(afile)], capsys)
    assert code == 2 and f"--out {afile} is an existing file" in err
    code, err = _run(["run", str(recipe), "--dry-run", "--data-dir", str(afile)], capsys)
    assert code == 2 and f"--data-dir {afile} is a file" in err


def test_a_read_only_place_for_the_run(tmp_path, capsys, monkeypatch):
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(rundir.LOCK_FILE):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", refuse)
    code, err = _run(["run", str(tiny_recipe(tmp_path)), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "read-only file system" in err and str(tmp_path / "run") in err and "Traceback" not in err


SUDOKU = ["--set", "task.name=sudoku", "--set", "task.config.size=4", "--set", "task.config.num_train=12",
          "--set", "task.config.num_test=4", "--set", "task.config.num_augmentations=0", "--set", "evaluators.1.name=sudoku"]


def test_a_full_disk_while_preparing_data_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    def full(path, **arrays):
        Path(path).write_bytes(b"PK\x03\x04 partial")  # what a write cut short by ENOSPC leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(np, "savez", full)
    data = tmp_path / "data"
    code, err = _run(["run", str(tiny_recipe(tmp_path)), "--dry-run", "--data-dir", str(data), *SUDOKU], capsys)
    assert code == 2 and "no space left on the device" in err and str(data / "sudoku") in err
    assert list(data.rglob("*")) == [data / "sudoku"]  # no *.tmp.npz, no partial cache


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".tmp-step_4" in str(f):
            raise RuntimeError(f"[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed ({f})")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    code, err = _run(["run", str(tiny_recipe(tmp_path)), "--out", str(out), "--set", "train.checkpoint_interval=2",
                      "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 2 and "could not write checkpoint step_4" in err and "step_2 is intact" in err
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2"]
    assert (ckpts / "latest").read_text().strip() == "step_2"


def test_a_directory_where_a_data_file_belongs(tmp_path, capsys):
    recipe, data = tiny_recipe(tmp_path), tmp_path / "data"
    assert main(["run", str(recipe), "--dry-run", "--data-dir", str(data), *SUDOKU]) == 0
    cached = next((data / "sudoku").glob("train-*.npz"))
    cached.unlink()
    cached.mkdir()
    capsys.readouterr()
    code, err = _run(["run", str(recipe), "--dry-run", "--data-dir", str(data), *SUDOKU], capsys)
    assert code == 2 and f"{cached} is a directory" in err
    csv_dir = tmp_path / "boards"
    csv_dir.mkdir()
    code, err = _run(["run", str(recipe), "--dry-run", "--data-dir", str(data), *SUDOKU, "--set", f"task.config.csv_train={csv_dir}"], capsys)
    assert code == 2 and f"{csv_dir} is a directory, not a CSV file" in err


def test_a_csv_that_is_not_utf8(tmp_path, capsys):
    bad = tmp_path / "boards.csv"
    bad.write_bytes(b"source,question,answer,rating\nx,1...,1234,0\ny,\xff\xfe..,1234,0\n")
    code, err = _run(["run", str(tiny_recipe(tmp_path)), "--dry-run", "--data-dir", str(tmp_path / "data"), *SUDOKU,
                      "--set", f"task.config.csv_train={bad}"], capsys)
    assert code == 2 and f"{bad}:3: not UTF-8 text (byte 0xff)" in err and "Traceback" not in err


def test_out_of_memory_names_the_size_and_suggests_a_smaller_batch(tmp_path, capsys, monkeypatch):
    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0; 79.1 GiB total capacity)")

    monkeypatch.setattr(Trainer, "train_step", oom)
    code, err = _run(["run", str(tiny_recipe(tmp_path)), "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 2 and "Traceback" not in err
    assert "tried to allocate 2.50 GiB" in err and "train.global_batch_size = 8" in err
    # The micro-batch, not the global batch: the same training, by gradient accumulation.
    assert "--set train.micro_batch_size=4" in err and "--set train.eval_batch_size=4" in err


# ------------------------------------------------------------------ 6. validation gaps


@pytest.mark.parametrize("override, expected", [
    ("train.log_interval=0", "log_interval must be > 0, got 0"),
    ("train.checkpoint_interval=-1", "checkpoint_interval must be >= 0"),
    ("task.config.num_test=0", "num_test must be"),
])
def test_values_that_used_to_crash_later_are_recipe_errors(tmp_path, capsys, override, expected):
    code, err = _run(["run", str(tiny_recipe(tmp_path)), "--out", str(tmp_path / "run"), "--set", override], capsys)
    assert code == 2 and expected in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("task", ["sudoku", "maze"])
def test_generated_tasks_refuse_empty_splits(tmp_path, capsys, task):
    code, err = _run(["run", str(tiny_recipe(tmp_path)), "--dry-run", "--set", f"task.name={task}",
                      "--set", "task.config.num_test=0"], capsys)
    assert code == 2 and "num_test must be > 0" in err


def test_arc_task_without_train_pairs_is_refused(tmp_path):
    from dis_core.contract.errors import DataError
    from dis_plugins.tasks.arc.sources import load_subset

    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "t1.json").write_text(json.dumps({"train": [], "test": [{"input": [[1]], "output": [[2]]}]}))
    with pytest.raises(DataError, match=r"t1\.json: task t1: no train pairs"):
        load_subset(str(tmp_path / "arc"))


def test_a_directory_given_as_a_file(tmp_path, capsys):
    folder = tmp_path / "recipes.toml"
    folder.mkdir()
    code, err = _run(["run", str(folder)], capsys)
    assert code == 2 and "is a directory, not a recipe file" in err and "not found" not in err
    plans = tmp_path / "plans"
    plans.mkdir()
    recipe = tiny_recipe(tmp_path, extra="")
    recipe.write_text(recipe.read_text().replace('[targets]\nname = "reveal_path"', f'[targets]\nname = "plan_import"\nconfig = {{ path = "{plans}" }}'))
    code, err = _run(["run", str(recipe), "--dry-run", "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 2 and f"plan file {plans} is a directory" in err


# ------------------------------------------------------------------ the slow marker


def test_slow_tests_are_selected_by_dash_m_slow():
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "tests/test_faults.py"],
                         cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    selected = [line for line in res.stdout.splitlines() if "::" in line]
    assert selected and all("test_faults.py" in line for line in selected), res.stdout[-2000:]
