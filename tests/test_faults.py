"""Fault injection with real processes (issue 13): SIGKILL during a step and during a checkpoint
write, then `--resume` reproduces the uninterrupted losses; two runs racing for one directory;
two ranks started by hand, one of which fails or is killed.

A child is `dis run` with one function patched to kill the process at a chosen moment
(`FAULTY_CLI`), so the fault lands exactly where the test says."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dis_core.tools.cli import main

from conftest import ROOT, subprocess_env, tiny_recipe

FAULTY_CLI = """
import os, signal, sys
from pathlib import Path
import torch
from dis_core.loop import trainer as T
from dis_core.contract.errors import DataError

kind, _, n = os.environ["DIS_TEST_FAULT"].partition(":")
n = int(n)
if kind == "kill_in_step":  # after backward, before the optimizer step of step n
    init = T.Trainer.__init__
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        step = self.engine.step
        def dying_step(*a, **k):
            if self.state.step == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(*a, **k)
        self.engine.step = dying_step
    T.Trainer.__init__ = patched
elif kind == "kill_in_checkpoint":  # half-way through writing step n's model file
    save = torch.save
    def dying_save(obj, f, *args, **kwargs):
        if f".tmp-step_{n}" in str(f) and "model_states" in str(f):
            Path(f).write_bytes(b"PK partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *args, **kwargs)
    torch.save = dying_save
elif kind in ("fail_rank1", "kill_rank1"):  # rank 1 fails (or is killed) at step n
    train_step = T.Trainer.train_step
    def failing(self):
        if self.rank == 1 and self.state.step + 1 == n:
            if kind == "kill_rank1":
                os.kill(os.getpid(), signal.SIGKILL)
            raise DataError("boards.csv:7: answer breaks a row constraint")
        return train_step(self)
    T.Trainer.train_step = failing

from dis_core.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""

COMMON = ["--set", "train.checkpoint_interval=2", "--set", "train.steps=8"]


def _child(args: list[str], fault: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAULTY_CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(DIS_TEST_FAULT=fault, PYTHONPATH=str(ROOT), **env))


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    out = tmp / "run"
    assert main(["run", str(tiny_recipe(tmp)), "--out", str(out), "--data-dir", str(tmp / "data"), *COMMON]) == 0
    return _losses(out)


@pytest.mark.parametrize("fault, resumes_from", [("kill_in_step:5", "step_4"), ("kill_in_checkpoint:4", "step_2")])
def test_sigkill_then_resume_reproduces_the_losses(tmp_path, uninterrupted, fault, resumes_from):
    recipe, out = tiny_recipe(tmp_path), tmp_path / "run"
    data = ["--data-dir", str(tmp_path / "data")]
    killed = _child(["run", str(recipe), "--out", str(out), *data, *COMMON], fault, tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == resumes_from
    # The kill left the lock file behind, but not the lock: resuming needs no clean-up.
    assert main(["run", str(recipe), "--out", str(out), *data, *COMMON, "--resume"]) == 0
    assert _losses(out) == uninterrupted
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_two_runs_racing_for_one_directory(tmp_path):
    recipe, out = tiny_recipe(tmp_path, steps=20), tmp_path / "run"
    cmd = [sys.executable, "-m", "dis_core.tools.cli", "run", str(recipe), "--out", str(out), "--data-dir", str(tmp_path / "data")]
    env = subprocess_env(PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert ("is in use by another run" in loser or "already holds a run" in loser) and "Traceback" not in loser
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)) and [s for s, split in keys if split == "train"] == list(range(1, 21))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["fail_rank1:3", "kill_rank1:3"])
def test_two_ranks_without_a_launcher_name_the_one_that_failed(tmp_path, fault):
    recipe, out = tiny_recipe(tmp_path, steps=50), tmp_path / "run"
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = subprocess_env(DIS_TEST_FAULT=fault, PYTHONPATH=str(ROOT), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", FAULTY_CLI, "run", str(recipe), "--out", str(out),
                                       "--data-dir", str(tmp_path / "data")],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (code0, err0), (code1, err1) = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert code0 == 2, err0[-3000:]
    assert "Traceback" not in err0 and "error: rank 0 of 2: stopped because" in err0
    if fault.startswith("fail"):
        assert code1 == 2 and "boards.csv:7" in err1
        assert "rank 1 failed: boards.csv:7: answer breaks a row constraint" in err0
    else:
        assert code1 == -9
        assert "rank 1 ended without reporting an error" in err0


def _native_threads() -> dict[int, str]:
    """This process's threads that Python's `threading` does not know (gloo's, the TCP store's:
    C++ threads), by thread id, with their names; /proc/self/task (Linux) lists every thread."""
    import threading

    python = {t.native_id for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:  # ended meanwhile
            continue
        if int(tid) not in python:
            out[int(tid)] = name
    return out


def test_a_command_ends_its_process_group_before_the_interpreter_does(tmp_path):
    # A group left to the interpreter's exit can abort it (SIGABRT after the results were written):
    # the CLI destroys it itself, and the group's threads (gloo's run loops and transport loop, the
    # TCP store's server on rank 0) end with it: none is left, not even after a training run, whose
    # step imports torch._dynamo and with it torch.distributed.nn.functional (that module's default
    # arguments would keep a group that exists when it is imported). The launcher variables a lone
    # process set for itself go too, so that a second command in the same process starts a fresh group.
    import torch.distributed as dist

    before = _native_threads()
    out = tmp_path / "run"
    assert main(["run", str(tiny_recipe(tmp_path, steps=2)), "--out", str(out), "--data-dir", str(tmp_path / "data")]) == 0
    assert "torch._dynamo" in sys.modules  # what imports torch.distributed.nn.functional late
    assert not dist.is_initialized()
    assert "MASTER_PORT" not in os.environ
    left = {tid: name for tid, name in _native_threads().items() if tid not in before}
    assert left == {}, f"threads outlived the run's process group: {left}"
    assert main(["eval", str(out), "--out", str(tmp_path / "ev"), "--data-dir", str(tmp_path / "data")]) == 0  # a new group
    assert not dist.is_initialized() and "MASTER_PORT" not in os.environ
    left = {tid: name for tid, name in _native_threads().items() if tid not in before}
    assert left == {}, f"threads outlived the evaluation's process group: {left}"
