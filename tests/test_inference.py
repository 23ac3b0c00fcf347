"""Using a trained model (issue 10): `dis_core.load`, `dis eval`, `dis predict`, trajectory pictures,
and the tasks' optional input parsers and render hooks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dis_core
from dis_core.tools import cli
from dis_core.wiring.recipe import load_recipe
from dis_core.loop.trainer import Trainer

from conftest import ROOT, subprocess_env, tiny_arc_recipe, tiny_recipe


def _train(tmp_path, registry, overrides=(), name="run"):
    resolved = load_recipe(tiny_recipe(tmp_path, steps=20), registry, ["train.eval_interval=10", *overrides])
    out = tmp_path / name
    summary = Trainer(resolved, registry, out, data_dir=tmp_path / "data").fit(registry)
    return out, summary


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A ~20-step tiny N-Queens run with EMA weights, evaluated and checkpointed at steps 10 and 20."""
    from dis_core.wiring.plugins import load_registry

    tmp = tmp_path_factory.mktemp("inference")
    out, summary = _train(tmp, load_registry(), ["train.ema=0.9", "train.checkpoint_interval=10"])
    return out, summary, tmp / "data"


def _evaluator_metrics(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k.split("/")[0] in ("exact", "nqueens", "diagnostics")}


def test_eval_reproduces_the_final_metrics_exactly(run, tmp_path, capsys):
    out, summary, data = run
    assert cli.main(["eval", str(out), "--out", str(tmp_path / "ev"), "--data-dir", str(data)]) == 0
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["metrics"] == _evaluator_metrics(summary)  # exact, not approximately
    assert saved["step"] == 20 and saved["weights"] == "ema" and saved["checkpoint"].endswith("step_20")
    shown = json.loads(capsys.readouterr().out)
    assert shown["nqueens/valid_solution_rate"] == round(summary["nqueens/valid_solution_rate"], 4)


def test_trained_weights_without_ema_and_a_checkpoint_directory(tmp_path, registry):
    out, summary = _train(tmp_path, registry)
    model = dis_core.load(out / "checkpoints" / "step_20", data_dir=tmp_path / "data", registry=registry)
    assert model.weights == "trained" and model.step == 20 and model.run_dir == out
    assert model.evaluate() == _evaluator_metrics(summary)
    with pytest.raises(dis_core.contract.errors.CheckpointError, match="no ema_weights.pt"):
        dis_core.load(out, weights="ema", data_dir=tmp_path / "data", registry=registry)


def test_evaluate_an_earlier_checkpoint_and_overrides(run, registry):
    out, summary, data = run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (at_10,) = [r for r in rows if r["split"] == "eval" and r["step"] == 10]
    earlier = dis_core.load(out / "checkpoints" / "step_10", data_dir=data, registry=registry)
    assert (earlier.step, earlier.weights) == (10, "ema")
    assert earlier.evaluate() == _evaluator_metrics(at_10) != _evaluator_metrics(summary)  # that step's evaluation
    model = dis_core.load(out, data_dir=data, registry=registry)
    assert model.step == 20
    part = model.evaluate(limit=5)
    assert part["nqueens/count"] == 5
    # Another test set through --set: 7 boards instead of 12, same weights.
    other = model.evaluate(set_overrides=["task.config.num_test=7"])
    assert other["nqueens/count"] == 7
    mine, theirs = model.with_overrides(["task.config.num_test=7"]).backbone.state_dict(), model.backbone.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_checkpoint_that_does_not_fit_exits_2_naming_the_tensors(run, capsys):
    out, _, data = run
    code = cli.main(["eval", str(out), "--set", "backbone.config.hidden_size=16", "--data-dir", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "does not fit" in err and "shapes differ" in err
    assert "embed.tokens.weight (checkpoint [3, 32], model [3, 16])" in err


def test_not_a_run_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", str(tmp_path / "empty")]) == 2
    assert "not a dis run directory" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2


def test_predict_answers_boards_with_per_step_trajectories(run, tmp_path):
    out, _, data = run
    boards = [
        ["...Q.", ".....", ".....", "..Q..", "....."],  # strings
        [[0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],  # a 0/1 grid
        "Q....................Q...",  # one string of n*n cells
    ]
    (tmp_path / "boards.json").write_text(json.dumps(boards))
    assert cli.main(["predict", str(out), str(tmp_path / "boards.json"), "--out", str(tmp_path / "answers.json"),
                     "--data-dir", str(data), "--batch-size", "2"]) == 0
    doc = json.loads((tmp_path / "answers.json").read_text())
    assert doc["task"] == "nqueens" and doc["steps"] == 3 and len(doc["predictions"]) == 3
    for board, p in zip(boards, doc["predictions"]):
        assert p["input"] == board and p["steps"] == 3
        assert len(p["trajectory"]) == 3 == len(p["changed"]) and p["answer"] == p["trajectory"][-1]
    strings, ints = doc["predictions"][0]["answer"], doc["predictions"][1]["answer"]
    assert all(isinstance(r, str) and len(r) == 5 and set(r) <= {"Q", ".", "?"} for r in strings)
    assert all(isinstance(r, list) and set(r) <= {0, 1, -1} for r in ints)
    # The same answers as the rollout over the task's own encoding of those boards.
    model = dis_core.load(out, data_dir=data)
    again = model.predict(boards, steps=2)
    assert [p["trajectory"] for p in again] == [p["trajectory"][:2] for p in doc["predictions"]]
    # The guidance scale w: 1 is the plain model; another w goes through the same rollout.
    assert model.predict(boards, guidance=1.0) == model.predict(boards)
    batch = {k: torch.as_tensor(v) for k, v in model.encode(boards).items()}
    guided = model.rollout(batch, guidance=0.0)
    assert [p["trajectory"] for p in model.predict(boards, guidance=0.0)] == [
        [model.decode(f, b) for f in guided.preds[i, : int(guided.steps[i])].numpy()] for i, b in enumerate(boards)]
    assert cli.main(["predict", str(out), str(tmp_path / "boards.json"), "--w", "0.5", "--out", str(tmp_path / "w.json"),
                     "--data-dir", str(data)]) == 0
    assert json.loads((tmp_path / "w.json").read_text())["w"] == 0.5


@pytest.mark.parametrize("inputs, words", [
    ('{"a": 1}', "a JSON array"),
    ("[[\"Q\"]]", "puzzle 0"),
    ('[["..Z..", ".....", ".....", ".....", "....."]]', "'Z' is neither"),
    ("not json", "not valid JSON"),
])
def test_predict_bad_inputs_exit_2(run, tmp_path, capsys, inputs, words):
    out, _, data = run
    (tmp_path / "in.json").write_text(inputs)
    assert cli.main(["predict", str(out), str(tmp_path / "in.json"), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_predict_steps_out_of_range_exits_2(run, tmp_path, capsys):
    out, _, data = run
    (tmp_path / "in.json").write_text(json.dumps([["....."] * 5]))
    assert cli.main(["predict", str(out), str(tmp_path / "in.json"), "--steps", "9", "--data-dir", str(data)]) == 2
    assert "1..3 supervision steps" in capsys.readouterr().err


def test_trajectories_write_pngs_and_an_index(run, tmp_path):
    import matplotlib.image

    out, _, data = run
    assert cli.main(["eval", str(out), "--out", str(tmp_path / "ev"), "--trajectories", "4", "--data-dir", str(data)]) == 0
    folder = tmp_path / "ev" / "trajectories"
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"example_{i:06d}.png" for i in (3, 5, 6, 7)]  # 4 of 12 at random, seed 0 (the default)
    page = (folder / "index.html").read_text()
    assert all(f'src="{p.name}"' in page for p in pngs)
    img = matplotlib.image.imread(pngs[0])
    assert img.shape[1] > 600 and img.shape[2] in (3, 4)  # question + 3 steps + answer, side by side


@pytest.mark.slow
def test_eval_under_a_launcher_is_sliced_and_merged(run, tmp_path):
    """Two gloo processes evaluate half the test split each; rank 0 merges: the same metrics."""
    pytest.importorskip("torch.distributed.run")
    out, summary, data = run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dis_core.tools.cli", "eval", str(out), "--out", str(tmp_path / "ev2"), "--data-dir", str(data)]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert saved["world_size"] == 2
    assert saved["metrics"]["nqueens/count"] == 12
    # Counts and rates agree with the single-process run, up to the order of fp32 partial sums
    # (the exact evaluator sums per-example accuracies batch by batch).
    for key, value in _evaluator_metrics(summary).items():
        assert saved["metrics"][key] == pytest.approx(value, rel=1e-6), key



# ------------------------------------------------------------------ the tasks' optional hooks


def _tasks(tmp_path):
    from dis_plugins.tasks.maze import MazeConfig, MazeTask
    from dis_plugins.tasks.nqueens import NQueensConfig, NQueensTask
    from dis_plugins.tasks.sudoku import SudokuConfig, SudokuTask

    yield "nqueens", NQueensTask(NQueensConfig(board_size=6, num_train=4, num_test=3))
    yield "sudoku", SudokuTask(SudokuConfig(size=4, num_train=4, num_test=3, num_augmentations=0, cache=False), tmp_path)
    yield "maze", MazeTask(MazeConfig(rows=7, cols=7, num_train=4, num_test=3, min_path_length=4, cache=False), tmp_path)


def test_each_task_parses_its_own_format_and_draws_its_grids(tmp_path):
    for name, task in _tasks(tmp_path):
        batch = task.dataset("test").get(np.arange(3))
        puzzles = [task.decode(x) for x in batch["inputs"]]
        assert (task.encode_inputs(puzzles)["inputs"] == batch["inputs"]).all(), name
        drawn = task.render_grid(batch["labels"][0], batch["inputs"][0])
        rgb = drawn["rgb"] if isinstance(drawn, dict) else drawn
        assert rgb.shape == (*task.spec.grid_shape, 3) and rgb.dtype == np.uint8, name
    sudoku = dict(_tasks(tmp_path))["sudoku"]
    assert sudoku.decode(np.array([1, 2, 3, 4, 5] + [0] * 11)) == ".1234" + "?" * 11
    assert sudoku.decode(np.array([1, 2, 3, 4, 5] + [0] * 11), [[0] * 4] * 4)[0] == [0, 1, 2, 3]
    maze = dict(_tasks(tmp_path))["maze"]
    with pytest.raises(dis_core.contract.errors.DataError, match="exactly one 'S'"):
        maze.encode_inputs(["#" * 49])


def test_arc_parses_grids_and_task_ids(tmp_path):
    from dis_plugins.tasks.arc.task import ArcConfig, ArcTask

    folder = tmp_path / "te"
    folder.mkdir()
    task_json = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}], "test": [{"input": [[5]], "output": [[6]]}]}
    (folder / "t1.json").write_text(json.dumps(task_json))
    task = ArcTask(ArcConfig(train_subsets=(), test_subset=str(folder), num_augmentations=2))
    enc = task.encode_inputs([[[1, 2, 3], [4, 5, 6]], {"input": [[5]], "task_id": "t1"}, {"input": [[7]], "task_id": "other"}])
    assert enc["inputs"].shape == (3, 900) and list(enc["puzzle_ids"]) == [0, 1, 0]
    assert task.decode(enc["inputs"][0]) == [[1, 2, 3], [4, 5, 6]]
    test = task.dataset("test").get(np.arange(1))
    assert (task.encode_inputs([[[5]]])["inputs"][0] == test["inputs"][0]).all()  # the original variant's canvas
    assert task.render_grid(enc["inputs"][0]).shape == (30, 30, 3)
    with pytest.raises(dis_core.contract.errors.DataError, match="puzzle 0"):
        task.encode_inputs([[[10]]])


def test_a_task_without_hooks_gets_a_token_grid_and_token_lists(tmp_path):
    from dis_core.contract.interfaces import TaskSpec
    from dis_core.step.supervision import Rollout
    from dis_core.outputs.trajectories import draw

    class Bare:
        spec = TaskSpec(vocab_size=11, seq_len=8)

    inputs = torch.arange(8)[None] % 11
    batch = {"inputs": inputs, "labels": (inputs + 1) % 11, "example_ids": torch.tensor([7])}
    preds = torch.stack([inputs, (inputs + 1) % 11], 1)
    paths = draw(Bare(), batch, Rollout(preds=preds, q_halt=torch.zeros(1), steps=torch.tensor([2])), tmp_path)
    assert [p.name for p in paths] == ["example_000007.png"] and (tmp_path / "index.html").is_file()


def test_arc_kaggle_challenges_as_the_test_source_write_a_submission(tmp_path, registry):
    """A tiny ARC run evaluated again with its test tasks read from a Kaggle challenges file:
    the same puzzle identifiers, so the same metrics, and submission.json in the evaluator's folder."""
    rng = np.random.default_rng(0)

    def grid():
        return rng.integers(0, 4, rng.integers(1, 4, 2)).tolist()

    folders = {"tr": ["a1", "a2"], "te": ["e1", "e2"]}
    tasks = {}
    for folder, names in folders.items():
        (tmp_path / folder).mkdir()
        for name in names:
            tasks[name] = {kind: [{"input": grid(), "output": grid()} for _ in range(2)] for kind in ("train", "test")}
            (tmp_path / folder / f"{name}.json").write_text(json.dumps(tasks[name]))
    challenges = {n: {"train": tasks[n]["train"], "test": [{"input": p["input"]} for p in tasks[n]["test"]]} for n in folders["te"]}
    solutions = {n: [p["output"] for p in tasks[n]["test"]] for n in folders["te"]}
    (tmp_path / "k_evaluation_challenges.json").write_text(json.dumps(challenges))
    (tmp_path / "k_evaluation_solutions.json").write_text(json.dumps(solutions))
    recipe = tiny_arc_recipe(tmp_path / "arc.toml", tmp_path / "tr", tmp_path / "te", evaluators=("arc",), steps=4)
    out = tmp_path / "run"
    summary = Trainer(load_recipe(recipe, registry), registry, out, data_dir=tmp_path / "data").fit(registry)
    kaggle = tmp_path / "k_evaluation_challenges.json"
    assert cli.main(["eval", str(out), "--set", f"task.config.test_subset={json.dumps(str(kaggle))}", "--out", str(tmp_path / "ev")]) == 0
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["metrics"] == {k: v for k, v in summary.items() if k.startswith(("arc/", "diagnostics/"))}
    submission = json.loads((tmp_path / "ev" / "arc" / "submission.json").read_text())
    assert sorted(submission) == ["e1", "e2"] and all(len(submission[n]) == 2 for n in submission)


def test_sudoku_csv_as_another_test_source(tmp_path, registry):
    """`--set task.config.csv_test=FILE`: the run's model scores the puzzles of a Sudoku-Extreme
    style CSV instead of its generated test split."""
    recipe = tmp_path / "sudoku.toml"
    recipe.write_text("""
[task]
name = "sudoku"
config = { size = 4, num_train = 8, num_test = 4, num_augmentations = 1, cache = false }
[backbone]
name = "trm"
config = { hidden_size = 16, num_layers = 1, num_heads = 2, expansion = 2.0, T = 1, n = 1 }
[targets]
name = "reveal_path"
[supervision]
n_sup = 2
[[evaluators]]
name = "sudoku"
[train]
global_batch_size = 4
steps = 2
threads = 1
""")
    out = tmp_path / "run"
    trainer = Trainer(load_recipe(recipe, registry), registry, out, data_dir=tmp_path / "data")
    trainer.fit(registry)
    bank = trainer.solver.task.bank("test")
    rows = ["source,question,answer,rating"] + [
        f"t,{''.join(str(d) if d else '.' for d in q)},{''.join(map(str, a))},0"
        for q, a in zip(bank["question"][:3].tolist(), bank["solution"][:3].tolist())
    ]
    (tmp_path / "extra.csv").write_text("\n".join(rows) + "\n")
    assert cli.main(["eval", str(out), "--set", f"task.config.csv_test={json.dumps(str(tmp_path / 'extra.csv'))}",
                     "--out", str(tmp_path / "ev")]) == 0
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["metrics"]["sudoku/count"] == 3 and saved["overrides"][0].startswith("task.config.csv_test=")
