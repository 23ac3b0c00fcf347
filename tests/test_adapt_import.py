"""`dis adapt` and `--init-from` on an imported official ARC checkpoint (docs/adapt.md,
docs/checkpoints.md): the trm_arc fixture, recorded from the official TRM code, whose puzzle
table holds the official identifiers and whose run reads the official build (`reference_dir`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dis_core.tools import adapt as adapt_mod
from dis_core.tools.cli import main
from dis_core.tools.inference import locate, read_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "official_ckpt" / "trm_arc"


def _grid(rng, side):
    return rng.integers(1, 4, (side, side)).tolist()


def _task(rng):
    return {"train": [{"input": _grid(rng, 2), "output": _grid(rng, 2)} for _ in range(2)],
            "test": [{"input": _grid(rng, 2), "output": _grid(rng, 3)}]}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt_import")
    assert main(["import", str(FIXTURE / "step_6"), "--out", str(root / "run"), "--data", str(FIXTURE / "data")]) == 0
    rng = np.random.default_rng(0)
    # Center1 is a task of the official build (its demonstrations trained, as the official setup
    # does with evaluation tasks): the report must find its id in the table.
    new = {n: _task(rng) for n in ("Center1", "new2")}
    (root / "k_test_challenges.json").write_text(json.dumps(
        {n: {"train": t["train"], "test": [{"input": p["input"]} for p in t["test"]]} for n, t in new.items()}))
    (root / "k_test_solutions.json").write_text(json.dumps({n: [p["output"] for p in t["test"]] for n, t in new.items()}))
    return root, new


def _saved(run):
    return read_checkpoint(locate(run)[1])


def test_adapt_an_imported_official_checkpoint_to_two_new_tasks(imported, tmp_path):
    root, new = imported
    assert main(["adapt", str(root / "run"), str(root / "k_test_challenges.json"), "--out", str(tmp_path / "ad"),
                 "--steps", "2", "--threads", "1", "--device", "cpu", "--data-dir", str(tmp_path / "data")]) == 0
    report = json.loads((tmp_path / "ad" / "adapt.json").read_text())
    official = torch.load(FIXTURE / "step_6")["_orig_mod.model.inner.puzzle_emb.weights"]
    table = _saved(tmp_path / "ad")["puzzle_emb"]["weights"]
    first = official.shape[0]
    # New rows after the official table, which stays as the official run left it.
    assert report["base"]["table_rows"] == first and report["new_rows"] == table.shape[0] - first > 0
    assert torch.equal(table[:first], official)
    submission = json.loads((tmp_path / "ad" / "submission.json").read_text())
    assert sorted(submission) == sorted(new)
    assert all(len(s) == 1 and set(s[0]) == {"attempt_1", "attempt_2"} for s in submission.values())
    assert all(np.asarray(a).ndim == 2 for s in submission.values() for a in s[0].values())
    assert report["scored"] and "arc/pass@2" in report["metrics"]
    # The base read the official build: dis cannot tell which pairs it trained on, and says so.
    saw = report["leakage"]["base_saw"]
    assert saw["checked"] is False and "reference data directory" in saw["why"]
    assert saw["ids_checked"] is True and saw["tasks_with_id_in_table"] == ["Center1"]
    assert "demonstration pairs of the new tasks only" in report["leakage"]["training_uses"]


RECIPE = """
[task]
name = "arc"
config = {{ train_subsets = ["{tr}"], test_subset = "{te}", num_augmentations = 1 }}
[backbone]
name = "trm"
config = {{ hidden_size = 16, num_heads = 2, expansion = 2.0, T = 2, n = 2, num_layers = 1, puzzle_emb_len = 2, puzzle_emb_ndim = 24 }}
[halting]
name = "act"
config = {{ exploration_prob = 0.1 }}
[supervision]
n_sup = 3
step_input = "question"
[[evaluators]]
name = "exact"
[train]
global_batch_size = 4
steps = 2
threads = 1
precision = "fp32"
preflight = false
"""


@pytest.fixture(scope="module")
def arc_recipe(tmp_path_factory):
    """A dis ARC recipe of the trm_arc fixture's shapes over other tasks (so another number of
    puzzle identifiers than the official table's 13 rows)."""
    root = tmp_path_factory.mktemp("init_from")
    rng = np.random.default_rng(1)
    for folder, names in {"tr": ["a1", "a2", "a3"], "te": ["e1"]}.items():
        (root / folder).mkdir()
        for n in names:
            (root / folder / f"{n}.json").write_text(json.dumps(_task(rng)))
    (root / "arc.toml").write_text(RECIPE.format(tr=root / "tr", te=root / "te"))
    return root


def test_init_from_an_official_arc_checkpoint_resets_the_table_to_the_mean_row(arc_recipe):
    from dis_core.step.solver import Solver
    from dis_core.tools import checkpoint_io
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe

    registry = load_registry()
    solver = Solver.build(load_recipe(arc_recipe / "arc.toml", registry), registry, arc_recipe / "data", device=torch.device("cpu"))
    official = checkpoint_io.model_state(torch.load(FIXTURE / "step_6"))
    table = official["inner.puzzle_emb.weights"]
    rows = solver.puzzle_emb.weights
    assert rows.shape[0] != table.shape[0] and rows.shape[1] == table.shape[1] == 24
    done = checkpoint_io.init_weights(solver, FIXTURE / "step_6")
    assert done["puzzle_table"] == f"{table.shape[0]} rows -> {rows.shape[0]}: every row set to their mean"
    assert torch.allclose(rows, table.mean(0, keepdim=True).expand_as(rows))
    ours = solver.backbone.state_dict()
    for key, value in checkpoint_io.to_dis(official, trm=True).items():
        assert torch.equal(ours[key], value), key


def test_init_from_an_official_arc_checkpoint_fine_tunes_two_steps(arc_recipe, tmp_path, capsys):
    assert main(["run", str(arc_recipe / "arc.toml"), "--out", str(tmp_path / "ft"), "--init-from", str(FIXTURE / "step_6"),
                 "--data-dir", str(arc_recipe / "data")]) == 0
    assert "every row set to their mean" in capsys.readouterr().err
    from dis_core.tools import checkpoint_io

    official = checkpoint_io.model_state(torch.load(FIXTURE / "step_6"))
    saved = _saved(tmp_path / "ft")
    assert saved["step"] == 2
    tuned = {k.removeprefix("backbone."): v for k, v in saved["module"].items()}
    start = checkpoint_io.to_dis(official, trm=True)
    moved = max((tuned[k].float() - v.float()).abs().max().item() for k, v in start.items())
    assert 0 < moved < 0.05  # two small steps from the official weights, not from a fresh init
    table, mean = saved["puzzle_emb"]["weights"], official["inner.puzzle_emb.weights"].mean(0)
    # Every row started at the official mean; the rows a batch used moved, by at most 2 sign steps.
    assert table.shape[0] != official["inner.puzzle_emb.weights"].shape[0]
    assert (table - mean).abs().max().item() <= 2 * 1e-2 * 1.01 + 1e-6
