"""`dis eval --tasks/--num-aug/--resume`: a part of a large ARC evaluation, voted exactly as the
full evaluation votes on what it covers, with a time estimate, and resumable after a kill
(dis_core/loop/evaluation.py `PartialResults`, plugins/tasks/arc/evaluator.py)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal

import numpy as np
import pytest
import torch

from dis_core.contract.errors import UserError
from dis_core.loop import evaluation
from dis_core.loop.trainer import Trainer
from dis_core.tools.cli import main
from dis_core.wiring.recipe import load_recipe
from dis_plugins.tasks.arc.evaluator import EXACT_BITS, exact

from conftest import tiny_arc_recipe

TEST_TASKS = ["e1", "e2", "e3", "e4"]


def _task(rng, n_test):
    grid = lambda: rng.integers(0, 4, (3, 3)).tolist()  # noqa: E731 -- 3x3 grids of 4 colours
    return {"train": [{"input": grid(), "output": grid()} for _ in range(2)],
            "test": [{"input": grid(), "output": grid()} for _ in range(n_test)]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained ARC run: 4 held-out tasks (one with two test pairs), 4 variants each."""
    from dis_core.wiring.plugins import load_registry

    root = tmp_path_factory.mktemp("evalsub")
    rng = np.random.default_rng(0)
    for folder, names in {"tr": ["a1", "a2"], "te": TEST_TASKS}.items():
        (root / folder).mkdir()
        for n in names:
            (root / folder / f"{n}.json").write_text(json.dumps(_task(rng, 2 if n == "e2" else 1)))
    tiny_arc_recipe(root / "arc.toml", root / "tr", root / "te", num_augmentations=3, task_extra=", translate = false",
                    pass_ks=[1, 2], train_extra="eval_batch_size = 4")
    registry = load_registry()
    Trainer(load_recipe(root / "arc.toml", registry), registry, root / "run", data_dir=root / "data").fit(registry)
    return root


def _eval(run, out, *extra) -> int:
    return main(["eval", str(run / "run"), "--out", str(out), "--data-dir", str(run / "data"), *extra])


def _submission(out) -> dict:
    return json.loads((out / "arc" / "submission.json").read_text())


def _votes(out) -> dict:
    """Every (task, pair)'s candidates as the partial results hold them: {grid: [votes, exact
    sum of confidences]}, merged over the batches, plus the true output's key."""
    merged: dict = {}
    for path in sorted((out / "partial").glob("batch_*.pkl")):
        state = pickle.loads(path.read_bytes())[None]["arc"]
        for key, cands in state["votes"].items():
            for grid, (n, s, _) in cands.items():
                c = merged.setdefault(key, {}).setdefault(grid, [0, 0])
                c[0] += n
                c[1] += s
    return merged


def _metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_exact_confidence_sums_do_not_depend_on_grouping():
    rng = np.random.default_rng(1)
    xs = [float(x) for x in 1 / (1 + np.exp(-rng.normal(size=200) * 30))]
    xs += [1e-300, 5e-324, 0.0, 1.0]  # subnormals and the ends: still whole multiples of 2**-1074
    one_pass = sum(exact(x) for x in xs)
    halves = sum(exact(x) for x in xs[:77]) + sum(exact(x) for x in xs[77:])
    assert one_pass == halves
    float_sum = sum(xs)
    assert abs(one_pass / (1 << EXACT_BITS) - float_sum) <= 1e-12  # the same number, rounded once
    assert exact(float("nan")) == 0


def test_a_subset_votes_as_the_full_evaluation_on_the_tasks_it_covers(run, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _eval(run, full) == 0
    assert _eval(run, part, "--tasks", "e4,e2") == 0
    capsys.readouterr()
    whole, sub = _submission(full), _submission(part)
    for task in ("e2", "e4"):
        assert sub[task] == whole[task]
    # The vote inputs themselves, candidate by candidate (exact confidence sums included): the
    # full evaluation's tasks 1 and 3 (e2, e4) hold the same votes as the subset's.
    votes_full, votes_sub = _votes(full), _votes(part)
    assert {k: v for k, v in votes_full.items() if k[0] in (1, 3)} == votes_sub
    assert len(votes_sub) == 3  # e2's two test pairs and e4's one
    cov = _metrics(part)["coverage"]
    assert cov["tasks"] == ["e2", "e4"] and cov["tasks_total"] == 4
    assert cov["variants_per_pair"] == {"min": 4, "max": 4} and cov["examples"] == 12
    m = _metrics(part)["metrics"]
    assert m["coverage/tasks"] == 2 and m["coverage/examples"] == 12 and m["arc/tasks_evaluated"] == 2
    assert m["coverage/variants_max"] == 4


def test_num_aug_votes_as_a_full_evaluation_over_as_many_variants(run, tmp_path, capsys):
    full, part = tmp_path / "full2", tmp_path / "part1"
    # A full evaluation over the original and one augmentation (eval_variants = 2) ...
    assert _eval(run, full, "--set", "task.config.eval_variants=2") == 0
    # ... and the first two tasks, original and one augmentation, of the full split.
    assert _eval(run, part, "--tasks", "2", "--num-aug", "1") == 0
    capsys.readouterr()
    whole, sub = _submission(full), _submission(part)
    assert {t: sub[t] for t in ("e1", "e2")} == {t: whole[t] for t in ("e1", "e2")}
    assert {k: v for k, v in _votes(full).items() if k[0] in (0, 1)} == _votes(part)
    assert sum(n for cands in _votes(part).values() for n, _ in cands.values()) == 2 * 3  # 2 variants x 3 pairs
    cov = _metrics(part)["coverage"]
    assert cov["num_aug"] == 1 and cov["variants_per_pair"]["max"] == 2 and cov["examples"] == 6


def test_a_killed_evaluation_resumes_to_the_uninterrupted_result(run, tmp_path, monkeypatch, capsys):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _eval(run, straight) == 0  # 4 tasks: 5 test pairs x 4 variants = 20 examples, 5 batches of 4
    real_save, saves = evaluation.PartialResults.save, []

    def dying(self, b, states):
        if len(saves) == 2:
            raise KeyboardInterrupt  # the kill, as batch 3 ends: 2 batches on disk
        saves.append(b)
        real_save(self, b, states)

    monkeypatch.setattr(evaluation.PartialResults, "save", dying)
    assert _eval(run, killed) == 130
    assert not (killed / "metrics.json").exists()
    assert sorted(p.name for p in (killed / "partial").glob("batch_*")) == ["batch_000000.pkl", "batch_000001.pkl"]
    monkeypatch.setattr(evaluation.PartialResults, "save", real_save)

    # The rerun computes only the three batches left.
    rollouts = []
    real_rollout = type(_solver_probe(run)).rollout

    def counting(self, batch, **kw):
        rollouts.append(len(batch["inputs"]))
        return real_rollout(self, batch, **kw)

    monkeypatch.setattr(type(_solver_probe(run)), "rollout", counting)
    capsys.readouterr()
    assert main(["eval", str(run / "run"), "--resume", "--out", str(killed), "--data-dir", str(run / "data")]) == 0
    err = capsys.readouterr().err
    assert len(rollouts) == 3
    assert "12 example(s) to evaluate in 3 batch(es) of 4 (2 batch(es) done before" in err
    a, b = _metrics(straight), _metrics(killed)
    assert a["metrics"] == b["metrics"] and b["resumed_batches"] == 2
    assert (straight / "arc" / "submission.json").read_bytes() == (killed / "arc" / "submission.json").read_bytes()
    # Rerunning a finished evaluation computes nothing and gives the same again.
    rollouts.clear()
    assert _eval(run, killed) == 0
    assert rollouts == [] and _metrics(killed)["metrics"] == a["metrics"]


_PROBE = {}


def _solver_probe(run):
    """A Solver instance, for its class (the rollout every evaluation goes through)."""
    if "solver" not in _PROBE:
        import dis_core

        _PROBE["solver"] = dis_core.load(run / "run", data_dir=run / "data", device="cpu").solver
    return _PROBE["solver"]


def test_progress_and_time_estimate_are_printed(run, tmp_path, capsys):
    assert _eval(run, tmp_path / "p", "--tasks", "e1") == 0
    err = capsys.readouterr().err
    assert "4 example(s) to evaluate in 1 batch(es) of 4" in err
    assert _eval(run, tmp_path / "q", "--tasks", "3") == 0
    err = capsys.readouterr().err
    assert "16 example(s) to evaluate in 4 batch(es) of 4" in err  # e2 has two test pairs
    assert "the 12 example(s) left should take about" in err and "on this cpu" in err
    assert "eval: 100%" in err and "4/4" in err  # the bar over batches


def test_partial_results_of_another_checkpoint_or_setting_are_refused(run, tmp_path, capsys):
    out = tmp_path / "o"
    assert _eval(run, out, "--tasks", "e1") == 0
    capsys.readouterr()
    # Other settings into the same folder: refused, naming the manifest and what differs.
    assert _eval(run, out, "--tasks", "e2") == 2
    err = capsys.readouterr().err
    assert str(out / "partial" / "manifest.json") in err and "examples_sha256" in err and "Traceback" not in err
    assert _eval(run, out, "--tasks", "e1", "--batch-size", "2") == 2
    assert "batch_size" in capsys.readouterr().err
    # Another checkpoint: the same run with one weight changed.
    other = tmp_path / "other"
    shutil.copytree(run / "run", other)
    (ckpt,) = (other / "checkpoints").glob("step_*/mp_rank_00_model_states.pt")
    saved = torch.load(ckpt, weights_only=False)
    name = next(k for k in saved["module"] if k.startswith("backbone."))
    saved["module"][name] = saved["module"][name] + 0.01
    torch.save(saved, ckpt)
    before = sorted(p.name for p in (out / "partial").iterdir())
    assert main(["eval", str(other), "--out", str(out), "--tasks", "e1", "--data-dir", str(run / "data")]) == 2
    err = capsys.readouterr().err
    assert "weights_sha256" in err and "not merged" in err
    assert sorted(p.name for p in (out / "partial").iterdir()) == before  # nothing written into it


@pytest.mark.parametrize("args, words", [
    (["--tasks", "e1,nope"], ["'nope'", "--tasks", "e1, e2, e3, e4"]),
    (["--tasks", "9"], ["--tasks 9", "4 task(s)"]),
    (["--num-aug", "7"], ["--num-aug 7", "at most 3 augmentation(s)"]),
    (["--num-aug", "-1"], ["--num-aug -1"]),
    (["--tasks", "@missing.txt"], ["--tasks @missing.txt", "missing.txt"]),
    (["--tasks", " , "], ["names no task"]),
])
def test_user_mistakes_exit_2_naming_the_flag(run, tmp_path, capsys, args, words):
    assert _eval(run, tmp_path / "x", *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_tasks_from_a_file_and_resume_finds_the_newest_partial_eval(run, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("# two tasks\ne3\ne1\n")
    out = tmp_path / "f"
    assert _eval(run, out, "--tasks", f"@{ids}") == 0
    assert _metrics(out)["coverage"]["tasks"] == ["e1", "e3"]  # split order
    (tmp_path / "ids.json").write_text('["e3"]')
    assert _eval(run, tmp_path / "g", "--tasks", f"@{tmp_path / 'ids.json'}") == 0
    assert _metrics(tmp_path / "g")["coverage"]["tasks"] == ["e3"]
    # --resume without --out: nothing to resume in a folder without partial results.
    assert _eval(run, tmp_path / "none", "--resume") == 2
    assert "holds no partial results" in capsys.readouterr().err


def test_resume_without_out_continues_the_newest_unfinished_evaluation(run, tmp_path, monkeypatch, capsys):
    real_save = evaluation.PartialResults.save

    def dying(self, b, states):
        if b == 1:
            raise KeyboardInterrupt
        real_save(self, b, states)

    monkeypatch.setattr(evaluation.PartialResults, "save", dying)
    args = ["eval", str(run / "run"), "--data-dir", str(run / "data"), "--tasks", "e2"]
    assert main(args) == 130
    (left,) = [p for p in (run / "run").glob("eval-*") if not (p / "metrics.json").exists()]
    monkeypatch.setattr(evaluation.PartialResults, "save", real_save)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "(1 batch(es) done before" in capsys.readouterr().err
    assert _metrics(left)["resumed_batches"] == 1 and _metrics(left)["coverage"]["tasks"] == ["e2"]
    assert main([*args, "--resume"]) == 2  # nothing left unfinished
    assert "no unfinished evaluation" in capsys.readouterr().err


# ------------------------------------------------------------------ partial results under torchrun

# Run under torchrun instead of `dis_core.cli`: the kill of a rank as its batch STOP[rank] ends,
# once rank 0 has batch 2 on disk, so that the files left behind are known (rank 0: batches 0-2,
# rank 1: batch 0) whenever torchrun stops the other rank.
STOPPER = """
import sys, time
from dis_core.loop import evaluation
from dis_core.tools.cli import main

STOP = {0: 3, 1: 1}
real_save = evaluation.PartialResults.save


def dying(self, b, states):
    if b == STOP[self.rank]:
        deadline = time.monotonic() + 120
        while not (self.folder / "batch_000002.rank0.pkl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt
    real_save(self, b, states)


evaluation.PartialResults.save = dying
sys.exit(main(sys.argv[1:]))
"""


# Rank 1's default folder would be another eval-<time>.
LATE = """
import os, sys, types
from dis_core.tools import inference_cli
from dis_core.tools.cli import main

if os.environ["RANK"] == "1":
    inference_cli.time = types.SimpleNamespace(strftime=lambda fmt: "19990101-000000")
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(run, out, *extra, script: str | None = None, logs=None, source=None):
    """`dis eval` in two gloo processes (of `source`, default the run; without `out`, into the
    default RUN/eval-<time>); with `logs`, each rank's output goes to a file there."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ROOT, subprocess_env

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    launch = [torchrun, "--standalone", "--nproc_per_node", "2", *(["--log-dir", str(logs), "--redirects", "3"] if logs else [])]
    target = [script] if script else ["-m", "dis_core.cli"]
    where = ["--out", str(out)] if out is not None else []
    cmd = [*launch, *target, "eval", str(source or run / "run"), *where, "--data-dir", str(run / "data"), *extra]
    # A session of its own: a hang is ended with its workers, not by killing torchrun alone.
    proc = subprocess.Popen(cmd, cwd=run, env=subprocess_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _rank_files(out) -> list[str]:
    return sorted(p.name for p in (out / "partial").glob("batch_*"))


@pytest.mark.slow
def test_a_killed_two_process_evaluation_resumes_to_the_uninterrupted_result(run, tmp_path, capsys):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _torchrun(run, straight)  # 20 examples, 5 batches of 4: 2 per rank
    assert done.returncode == 0, done.stderr[-3000:]
    assert _metrics(straight)["world_size"] == 2 and _metrics(straight)["resumed_batches"] == 0
    assert _rank_files(straight) == [f"batch_{b:06d}.rank{r}.pkl" for b in range(5) for r in (0, 1)]

    (tmp_path / "stopper.py").write_text(STOPPER)
    stopped = _torchrun(run, killed, script=str(tmp_path / "stopper.py"))
    assert stopped.returncode != 0
    assert not (killed / "metrics.json").exists()
    assert _rank_files(killed) == ["batch_000000.rank0.pkl", "batch_000000.rank1.pkl", "batch_000001.rank0.pkl",
                                   "batch_000002.rank0.pkl"]
    kept = {name: (killed / "partial" / name).stat() for name in _rank_files(killed)}

    again = _torchrun(run, killed)
    assert again.returncode == 0, again.stderr[-3000:]
    # Batch 0 is on both ranks' disks: skipped. Rank 0 keeps its batches 1 and 2 as they were.
    assert "16 example(s) to evaluate in 4 batch(es) of 4 (1 batch(es) done before" in again.stderr
    for name, before in kept.items():
        after = (killed / "partial" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    a, b = _metrics(straight), _metrics(killed)
    assert a["metrics"] == b["metrics"] and b["resumed_batches"] == 1 and b["world_size"] == 2
    assert (straight / "arc" / "submission.json").read_bytes() == (killed / "arc" / "submission.json").read_bytes()
    # The ARC votes are exact whoever counted them: the two processes' are the lone process's.
    lone = tmp_path / "lone"
    assert _eval(run, lone) == 0
    assert _votes(lone) == _votes(straight)

    # Another number of processes, or another setting, is refused by every rank, naming the
    # manifest and the key, and writes nothing.
    before = _rank_files(killed)
    capsys.readouterr()
    assert _eval(run, killed) == 2
    err = capsys.readouterr().err
    assert str(killed / "partial" / "manifest.json") in err and "world_size" in err and "Traceback" not in err
    refused = _torchrun(run, killed, "--batch-size", "2", logs=tmp_path / "logs")
    assert refused.returncode != 0
    rank_errs = sorted((tmp_path / "logs").rglob("stderr.log"))
    assert len(rank_errs) == 2
    for path in rank_errs:
        text = path.read_text()
        assert str(killed / "partial" / "manifest.json") in text and "batch_size" in text and "Traceback" not in text, text[-2000:]
    assert "exitcode  : 2" in refused.stderr or "exitcode: 2" in refused.stderr, refused.stderr[-3000:]
    assert _rank_files(killed) == before and _metrics(killed)["metrics"] == a["metrics"]

    # Without --out, the ranks write into rank 0's RUN/eval-<time>, even when rank 1's clock
    # names another second.
    copy = tmp_path / "copy"
    shutil.copytree(run / "run", copy, ignore=shutil.ignore_patterns("eval-*"))
    (tmp_path / "late.py").write_text(LATE)
    done = _torchrun(run, None, "--tasks", "e2", source=copy, script=str(tmp_path / "late.py"))
    assert done.returncode == 0, done.stderr[-3000:]
    (default,) = copy.glob("eval-*")
    assert _rank_files(default) == [f"batch_00000{b}.rank{r}.pkl" for b in range(2) for r in (0, 1)]
    assert _metrics(default)["coverage"]["tasks"] == ["e2"]


def test_partial_results_of_another_number_of_processes_are_refused(run, tmp_path, capsys):
    out = tmp_path / "w"
    assert _eval(run, out, "--tasks", "e1") == 0
    manifest = out / "partial" / "manifest.json"
    # As a two-process evaluation leaves it: the same, but for the number of processes.
    saved = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**saved, "world_size": 2}))
    before = sorted(p.name for p in (out / "partial").iterdir())
    capsys.readouterr()
    assert _eval(run, out, "--tasks", "e1") == 2
    err = capsys.readouterr().err
    assert str(manifest) in err and "differs in world_size" in err and "another number of processes" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "partial").iterdir()) == before


class _RankZeroOfTwo:
    """`evaluation.dist` as rank 0 of two processes sees it, the other rank's part given."""

    def __init__(self, other_done: set[int], other_parts: list):
        self.other_done, self.other_parts = other_done, other_parts

    def rank(self) -> int:
        return 0

    def world_size(self) -> int:
        return 2

    def all_reduce_sum(self, t):
        if t.numel() == 1:  # a verdict: the other rank agrees
            return t
        return t + torch.tensor([int(b in self.other_done) for b in range(len(t))], dtype=t.dtype)

    def gather_objects(self, obj):
        return [obj, self.other_parts]


def test_ranks_skip_only_what_all_have_and_merge_batch_by_batch(tmp_path, monkeypatch):
    # The bookkeeping of the two-process test above, without processes: rank 0 got to batch 3
    # before the kill, rank 1 to batch 1.
    monkeypatch.setattr(evaluation, "dist", _RankZeroOfTwo({0}, [f"r1b{b}" for b in range(4)]))
    partial = evaluation.PartialResults(tmp_path / "partial", {"world_size": 2})
    for b in range(3):
        partial.save(b, f"r0b{b}")
    assert sorted(p.name for p in (tmp_path / "partial").glob("batch_*")) == [f"batch_00000{b}.rank0.pkl" for b in range(3)]
    assert partial.done() == {0, 1, 2}
    assert partial.done_everywhere(4) == {0} and partial.reused == 1
    partial.save(3, "r0b3")
    # The order a lone process meets the examples in: batch by batch, rank 0's slice first.
    assert partial.merged(4) == ["r0b0", "r1b0", "r0b1", "r1b1", "r0b2", "r1b2", "r0b3", "r1b3"]
    (tmp_path / "partial" / "batch_000009.rank0.pkl").write_bytes(b"")  # put there by hand
    with pytest.raises(UserError, match=r"batch_000009\.rank0\.pkl: a batch this evaluation does not have"):
        partial.done_everywhere(4)
    # Another rank's verdict reaches this one: it stops too, naming the manifest.
    monkeypatch.setattr(evaluation.dist, "all_reduce_sum", lambda t: t + 1)
    with pytest.raises(UserError, match="manifest.json: another process refused"):
        evaluation.PartialResults(tmp_path / "partial", {"world_size": 2})
