"""The run directory and the run's lifecycle (issue 17): restarting a run stopped before its
first checkpoint, never writing over the user's files, resuming whatever way the recipe path is
typed (and only runs of that recipe), unwritable checkpoints, SIGTERM, paths that are not UTF-8.

Each answer is one message with exit status 2 (or, for a signal, 130/143 after a checkpoint)
and no traceback."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dis_core.loop import checkpoint
from dis_core.outputs import rundir
from dis_core.tools.cli import main
from dis_core.wiring.plugins import load_registry
from dis_core.wiring.recipe import load_recipe
from dis_core.loop.trainer import Interrupted, Trainer

from conftest import ROOT, TINY_RECIPE, subprocess_env, tiny_recipe


def _run(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in _rows(run) if r["split"] == "train"]


def _data(tmp_path: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "data")]


# ------------------------------------------------------------------ 1. stopped before the first checkpoint


def test_resume_without_a_checkpoint_starts_again_from_step_0_in_place(tmp_path, capsys):
    recipe, out = tiny_recipe(tmp_path), tmp_path / "run"
    registry = load_registry()
    Trainer(load_recipe(recipe, registry), registry, out, data_dir=tmp_path / "data").fit(registry, stop_after=3)
    rundir.release_lock(out)  # as the kernel does for a killed run
    assert not checkpoint.written(out / "checkpoints") and _train_steps(out) == [1, 2, 3]
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "split": "tr')  # torn by the kill

    code, err = _run(["run", recipe, "--out", out, "--resume", *_data(tmp_path)], capsys)
    assert code == 0 and "Traceback" not in err
    assert err.count("no checkpoint to resume from") == 1 and "starts again from step 0" in err
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]  # the earlier rows dropped, not mixed in
    assert json.loads((out / "summary.json").read_text())["step"] == 6
    assert checkpoint.find_latest(out / "checkpoints", 1) == "step_6"


def test_an_interrupt_before_the_first_checkpoint_prints_the_command_that_restarts(tmp_path, capsys, monkeypatch):
    recipe, out = tiny_recipe(tmp_path), tmp_path / "my run"  # a space: the command must quote it
    train_step = Trainer.train_step

    def interrupted_at_2(self):
        if self.state.step == 2:
            raise KeyboardInterrupt  # a second Ctrl-C: no checkpoint
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_2)
    code, err = _run(["run", recipe, "--out", out, *_data(tmp_path), "--set", "train.log_interval=1"], capsys)
    assert code == 130 and "Traceback" not in err
    assert "interrupted before the run's first checkpoint" in err
    argv = shlex.split(re.search(r"with: (dis-run .*)", err).group(1))
    assert argv[0] == "dis-run" and argv[1:5] == [str(recipe), "--out", str(out), "--resume"]
    assert "--data-dir" in argv and "train.log_interval=1" in argv

    monkeypatch.setattr(Trainer, "train_step", train_step)
    code, err = _run(["run", *argv[1:]], capsys)  # exactly what it said
    assert code == 0, err
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------ 2. the user's files


def test_a_directory_holding_the_users_own_recipe_is_refused_and_left_as_it_was(tmp_path, capsys):
    exp = tmp_path / "experiments" / "plans"
    exp.mkdir(parents=True)
    hand_written = TINY_RECIPE.format(targets="reveal_path", steps=2) + "# my notes: keep them\n"
    (exp / "recipe.toml").write_text(hand_written)
    (exp / "plans.jsonl").write_text("{}\n")
    for resume in ([], ["--resume"]):
        code, err = _run(["run", exp / "recipe.toml", "--out", exp, *resume, *_data(tmp_path)], capsys)
        assert code == 2 and "Traceback" not in err
        assert f"--out {exp} holds files that are not a dis run (plans.jsonl, recipe.toml)" in err
    assert (exp / "recipe.toml").read_text() == hand_written
    assert sorted(p.name for p in exp.iterdir()) == ["plans.jsonl", "recipe.toml"]  # not even a .lock

    (exp / "plans.jsonl").unlink()  # a recipe.toml alone is no run either: dis's has run.json beside it
    code, err = _run(["run", exp / "recipe.toml", "--out", exp, *_data(tmp_path)], capsys)
    assert code == 2 and "(recipe.toml)" in err and (exp / "recipe.toml").read_text() == hand_written


def test_what_a_run_leaves_when_it_fails_before_training_is_not_in_the_way(tmp_path, capsys):
    recipe, out = tiny_recipe(tmp_path, steps=2), tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)  # what a run stopped while building leaves, with .lock
    (out / rundir.LOCK_FILE).write_text("")
    code, err = _run(["run", recipe, "--out", out, *_data(tmp_path)], capsys)
    assert code == 0, err
    assert rundir.is_run(out)


def test_an_empty_out_is_refused_and_the_current_directory_left_alone(tmp_path, capsys, monkeypatch):
    recipe = tiny_recipe(tmp_path, steps=2)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = _run(["run", recipe, "--out", "", *_data(tmp_path)], capsys)
    assert code == 2 and '--out "" names no directory' in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # `--out .` is taken at its word, and the same rule applies: this directory holds a recipe
    code, err = _run(["run", recipe, "--out", ".", *_data(tmp_path)], capsys)
    assert code == 2 and "holds files that are not a dis run (tiny.toml)" in err


# ------------------------------------------------------------------ 3. which run, which recipe


SUDOKU_CSV = "source,question,answer,rating\n" + "".join(
    f"{name},{question},1234341221434321,0\n"
    for name, question in [("a", "1.3.3.1.2.4.4.2."), ("b", ".2.4.4.2.1.3.3.1"), ("c", "12..34..21..43.."), ("d", "..34..12..43..21")]
)


def _recipe_with_a_data_path(folder: Path) -> Path:
    """A tiny Sudoku recipe that reads data.csv beside it (a path relative to the recipe file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.csv").write_text(SUDOKU_CSV)
    text = TINY_RECIPE.format(targets="reveal_path", steps=2)
    text = text.replace('name = "nqueens"\nconfig = { board_size = 5, num_train = 40, num_test = 12 }',
                        'name = "sudoku"\nconfig = { size = 4, csv_train = "data.csv", csv_test = "data.csv", num_augmentations = 0 }')
    text = text.replace('name = "nqueens"', 'name = "sudoku"')  # the evaluator
    (folder / "x.toml").write_text(text)
    return folder / "x.toml"


def test_resume_does_not_depend_on_how_the_recipe_path_is_typed(tmp_path, capsys, monkeypatch):
    recipe = _recipe_with_a_data_path(tmp_path / "recipes")
    (tmp_path / "link").symlink_to(tmp_path / "recipes")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    code, err = _run(["run", "../link/x.toml", "--out", "../run", *_data(tmp_path)], capsys)
    assert code == 0, err
    saved = (tmp_path / "run" / "recipe.toml").read_text()
    assert "/sub/../link/data.csv" in saved  # the spelling the resume must see through

    monkeypatch.chdir(tmp_path)
    code, err = _run(["run", "recipes/x.toml", "--out", "run", "--resume", "--set", "train.steps=3", *_data(tmp_path)], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 3

    # A real difference shows both values, key by key.
    code, err = _run(["run", recipe, "--out", "run", "--resume", "--set", "train.seed=3", "--set", "task.config.size=9",
                      *_data(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "train.seed: was 0, now 3" in err and "task.config.size: was 4, now 9" in err


def test_resume_without_out_takes_only_a_run_of_this_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = tiny_recipe(tmp_path, steps=2, name="exp.toml")
    tiny_recipe(tmp_path, steps=2, name="exp-copy.toml")  # the same content, another file
    (tmp_path / "other").mkdir()
    elsewhere = tiny_recipe(tmp_path / "other", steps=2, name="exp.toml")  # another file, the same name
    assert main(["run", "exp-copy.toml", *_data(tmp_path)]) == 0
    assert main(["run", str(elsewhere), *_data(tmp_path)]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    infos = {run: (run / "run.json").read_text() for run in runs}

    code, err = _run(["run", "exp.toml", "--resume", *_data(tmp_path)], capsys)
    assert code == 2 and "there is no run of exp.toml to resume" in err and "Traceback" not in err
    assert {run: (run / "run.json").read_text() for run in runs} == infos  # nothing relabelled

    # Its own run is found however the path is typed.
    assert main(["run", str(exp), *_data(tmp_path)]) == 0
    mine = next(p for p in (tmp_path / "runs").iterdir() if p not in runs)
    assert json.loads((mine / "run.json").read_text())["recipe_path"] == str(exp.resolve())
    code, err = _run(["run", "./exp.toml", "--resume", "--set", "train.steps=3", *_data(tmp_path)], capsys)
    assert code == 0, err
    assert json.loads((mine / "summary.json").read_text())["step"] == 3


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20250102-030405")
    made = []
    for _ in range(11):
        made.append(rundir.default_out("x.toml"))
        made[-1].mkdir(parents=True)
    assert [p.name for p in made[:3]] == ["x-20250102-030405", "x-20250102-030405-2", "x-20250102-030405-3"]
    assert rundir.latest_run("x.toml") == made[-1]  # -11 is newer than -2, whatever the names' order


# ------------------------------------------------------------------ 4. unwritable checkpoints


def test_an_unwritable_checkpoint_directory_is_named_before_training(tmp_path, capsys, monkeypatch):
    recipe, out = tiny_recipe(tmp_path, steps=2), tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), *_data(tmp_path)]) == 0
    access = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, mode: Path(p).name != "checkpoints" and access(p, mode))
    code, err = _run(["run", recipe, "--out", out, "--resume", "--set", "train.steps=4", *_data(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"cannot write to {out / 'checkpoints'}: permission denied" in err and "chmod" in err
    assert _train_steps(out) == [1, 2]  # nothing trained


def test_a_checkpoint_folder_that_cannot_be_created_is_a_checkpoint_error(tmp_path, capsys, monkeypatch):
    # What a checkpoints/ folder the user cannot write to does when the check above cannot see it
    # (ACLs, network file systems): DeepSpeed only logs the failed mkdir, torch then fails.
    recipe, out = tiny_recipe(tmp_path), tmp_path / "run"
    mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if ".tmp-step_4" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    code, err = _run(["run", recipe, "--out", out, "--set", "train.checkpoint_interval=2", *_data(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "cannot write checkpoint step_4" in err and str(out / "checkpoints" / ".tmp-step_4") in err and "Permission denied" in err
    assert checkpoint.find_latest(out / "checkpoints", 1) == "step_2"


def test_torch_failing_on_a_missing_folder_is_a_checkpoint_error(tmp_path, registry, monkeypatch):
    import torch

    from dis_core.contract.errors import CheckpointError

    save = torch.save

    def parent_gone(obj, f, *args, **kwargs):
        if ".tmp-step_2" in str(f):
            raise RuntimeError(f"Parent directory {Path(f).parent} does not exist.")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", parent_gone)
    trainer = Trainer(load_recipe(tiny_recipe(tmp_path, steps=2), registry), registry, tmp_path / "run", data_dir=tmp_path / "data")
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step_2 under .*Parent directory"):
        trainer.fit(registry)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


# ------------------------------------------------------------------ 5. SIGTERM


@pytest.mark.parametrize("signals, kept", [(1, "step_3"), (2, None)])
def test_a_signal_writes_a_checkpoint_and_restores_the_handler(tmp_path, registry, signals, kept):
    trainer = Trainer(load_recipe(tiny_recipe(tmp_path, steps=50), registry), registry, tmp_path / "run", data_dir=tmp_path / "data")
    train_step = trainer.train_step

    def terminated_at_3():
        out = train_step()
        if trainer.state.step == 3:
            for _ in range(signals):  # a second one stops at once
                os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = terminated_at_3
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        trainer.fit(registry)
    assert info.value.signum == signal.SIGTERM and info.value.step == 3
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert checkpoint.find_latest(tmp_path / "run" / "checkpoints", 1) == kept
    assert (info.value.checkpoint.name if info.value.checkpoint else None) == kept


def test_sigterm_to_dis_run_checkpoints_then_resume_continues(tmp_path):
    recipe, out = tiny_recipe(tmp_path, steps=2000), tmp_path / "run"
    dis_run = Path(sys.executable).parent / "dis-run"
    child = subprocess.Popen([str(dis_run), str(recipe), "--out", str(out), *_data(tmp_path)], cwd=tmp_path,
                             env=subprocess_env(PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stderr:  # the handlers are in place once training is announced
            if "training" in line and "steps=2000" in line:
                break
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM at step" in err
    assert f"Continue with: dis-run {recipe} --out {out} --resume" in err
    step = int(checkpoint.find_latest(out / "checkpoints", 1).removeprefix("step_"))
    assert 1 <= step < 2000 and _train_steps(out) == list(range(1, step + 1))

    code = main(["run", str(recipe), "--out", str(out), "--resume", "--set", f"train.steps={step + 2}", *_data(tmp_path)])
    assert code == 0
    assert _train_steps(out) == list(range(1, step + 3))
    assert json.loads((out / "summary.json").read_text())["step"] == step + 2


# ------------------------------------------------------------------ 6. a path that is not UTF-8


def test_a_run_directory_whose_name_is_not_utf8(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=2)
    out = tmp_path / b"run\xff".decode("utf-8", "surrogateescape")  # how Python hands over the byte 0xff
    dis_run = Path(sys.executable).parent / "dis-run"
    for more in ([], ["--resume", "--set", "train.steps=3"]):
        # A child process: the path reaches sys.argv (written into .lock) as from a shell.
        done = subprocess.run([str(dis_run), str(recipe), "--out", str(out), *_data(tmp_path), *more], cwd=tmp_path,
                              env=subprocess_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert os.fsencode(out).endswith(b"run\xff")
    assert _train_steps(out) == [1, 2, 3] and json.loads((out / "summary.json").read_text())["step"] == 3
    assert "--resume" in json.loads((out / "run.json").read_text())["command"]
