"""`dis eval --tasks/--num-aug/--resume`: a part of a large ARC evaluation, voted exactly as the
full evaluation votes on what it covers, with a time estimate, and resumable after a kill
(dis_core/loop/evaluation.py `PartialResults`, plugins/tasks/arc/evaluator.py)."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from dis_core.loop import evaluation
from dis_core.loop.trainer import Trainer
from dis_core.tools.cli import main
from dis_core.wiring.recipe import load_recipe
from dis_plugins.tasks.arc.evaluator import EXACT_BITS, exact

TEST_TASKS = ["e1", "e2", "e3", "e4"]

RECIPE = """
[task]
name = "arc"
config = {{ train_subsets = ["{tr}"], test_subset = "{te}", num_augmentations = 3, translate = false }}
[backbone]
name = "trm"
config = {{ hidden_size = 16, num_layers = 1, num_heads = 2, expansion = 2.0, T = 1, n = 1, puzzle_emb_ndim = 16 }}
[targets]
name = "reveal_path"
[supervision]
n_sup = 2
[[evaluators]]
name = "arc"
config = {{ pass_ks = [1, 2] }}
[[evaluators]]
name = "exact"
[train]
global_batch_size = 8
eval_batch_size = 4
steps = 3
threads = 1
"""


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
    (root / "arc.toml").write_text(RECIPE.format(tr=root / "tr", te=root / "te"))
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
