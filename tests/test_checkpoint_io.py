"""Published checkpoints in and out (dis_core/tools/checkpoint_io.py, docs/checkpoints.md).

The fixtures in tests/fixtures/official_ckpt/ were recorded by tests/make_official_ckpt.py from
the official TRM code (its dataset builders, a few steps of its `train_batch`, its checkpoint
format with `_orig_mod.` keys and its own `evaluate` with the ARC evaluator): TRM on Sudoku, TRM
on an ARC subset (two held-out tasks x 4 variants, official identifiers), TRM on a second ARC
subset that the official model partly solves (pass@K 1/3), TRM on 7x7 mazes, HRM on Sudoku; and from
the DIS repository's own training script: its ACTV5 model on Sudoku (`step_80.pth`). dis imports
each one and must give the official per-example predictions exactly and the halting logits
within rounding, and on ARC the same votes: submission.json identical, the same pass@K.

The other direction: `dis_export_arc` holds a model trained by `dis run` (a portable folder) and
what the official code gave for its `dis export --format official` (loaded by the official
`load_checkpoint`, evaluated by the official `evaluate`); `dis eval` must give the same.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dis_core
from dis_core.contract.errors import CheckpointError, UserError
from dis_core.step.data import to_torch
from dis_core.tools import checkpoint_io
from dis_core.tools.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "official_ckpt"
CASES = ["trm_sudoku", "trm_arc", "hrm_sudoku", "dis_sudoku", "trm_maze", "trm_arc_solved"]
ARC_CASES = ["trm_arc", "trm_arc_solved"]
sys.path.insert(0, str(Path(__file__).parent))
import make_official_ckpt  # noqa: E402  -- the generator: its tensor digests (no official code is imported)


def step_file(name: str) -> Path:
    """The checkpoint file of a fixture: `step_N` (TRM, HRM) or `step_N.pth` (DIS's script)."""
    return next(p for p in (FIXTURES / name).iterdir() if p.name.startswith("step_"))


def official(name: str) -> dict:
    return torch.load(FIXTURES / name / "official_eval.pt", weights_only=False)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each fixture imported once through the command line, as a user does."""
    root = tmp_path_factory.mktemp("imported")
    runs = {}
    for name in CASES:
        # The folder (dis finds its newest step_N / step_N.pth), as a downloaded checkpoint is.
        assert main(["import", str(FIXTURES / name), "--out", str(root / name), "--data", str(FIXTURES / name / "data")]) == 0
        runs[name] = root / name
    return runs


def real_rows(name: str, rec: dict, n: int) -> np.ndarray:
    """The official evaluation pads its last batch with blank-identifier rows; dis does not."""
    ids = rec["outputs"]["puzzle_identifiers"].numpy()
    keep = ids != 0 if "arc" in name else np.arange(len(ids)) < n
    assert keep.sum() == n
    return keep


def predictions(model) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    split = model.task.dataset("test")
    batch = split.get(np.arange(len(split)))
    result = model.rollout({k: v for k, v in to_torch(batch).items() if torch.is_tensor(v)})
    assert (result.steps == model.halting.max_steps).all()  # every example runs all steps, as the official evaluation
    return result.preds[:, -1].numpy(), result.q_halt, np.asarray(batch["puzzle_ids"])


@pytest.mark.parametrize("name", CASES)
def test_imported_checkpoint_predicts_as_the_official_evaluation(name, imported):
    rec = official(name)
    model = dis_core.load(imported[name], device="cpu")
    preds, q, ids = predictions(model)
    keep = real_rows(name, rec, len(preds))
    out = rec["outputs"]
    assert np.array_equal(ids, out["puzzle_identifiers"].numpy()[keep])  # the same examples in the same order
    assert np.array_equal(preds, out["preds"].numpy()[keep])
    ref_q = out["q_halt_logits"][keep]
    assert (q - ref_q).abs().max().item() <= 1e-4 * max(1.0, ref_q.abs().max().item())
    # The loss head's token accuracy over the examples (official: mean per example of the
    # share of correct cells), recomputed from dis's evaluation.
    metrics = model.evaluate()
    assert metrics["exact/exact_accuracy"] == pytest.approx(rec["metrics"]["all"]["exact_accuracy"])
    assert metrics["exact/accuracy"] == pytest.approx(rec["metrics"]["all"]["accuracy"], abs=1e-6)


@pytest.mark.parametrize("name", ARC_CASES)
def test_arc_votes_and_submission_match_the_official_evaluator(name, imported, tmp_path):
    rec = official(name)
    assert main(["eval", str(imported[name]), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    for k in (1, 2, 5):
        assert metrics[f"arc/pass@{k}"] == rec["metrics"][f"ARC/pass@{k}"]
    assert json.loads((tmp_path / "ev" / "arc" / "submission.json").read_text()) == rec["submission"]
    assert metrics["exact/exact_accuracy"] == pytest.approx(rec["metrics"]["all"]["exact_accuracy"])


def test_arc_solved_fixture_makes_the_equality_non_trivial():
    """trm_arc_solved: the official evaluation solves a held-out task (the copy) and not the
    others, so the pass@K and submission.json that dis must reproduce are neither all right nor
    all wrong."""
    rec = official("trm_arc_solved")
    assert 0 < rec["metrics"]["ARC/pass@1"] < 1 and 0 < rec["metrics"]["ARC/pass@2"] < 1
    assert 0 < rec["metrics"]["all"]["exact_accuracy"] < 1
    tasks = json.loads((FIXTURES / "trm_arc_solved" / "data" / "test_puzzles.json").read_text())
    solutions = json.loads((FIXTURES / "trm_arc_solved" / "tasks.json").read_text())["evaluation"]
    solved = {t for t, attempts in rec["submission"].items()
              if any(a == solutions[t]["test"][0]["output"] for a in attempts[0].values())}
    assert solved and solved != set(tasks)


@pytest.mark.parametrize("name", ["trm_arc_solved", "trm_maze"])
def test_prediction_margins_are_safe_across_cpus(name, imported):
    """Predictions are compared exactly above: that holds on any x86 CPU only if no cell's best
    two logits are within fp32 rounding (~1e-5 here). The recorded fixtures leave a wide gap."""
    model = dis_core.load(imported[name], device="cpu")
    seen = []
    hook = model.backbone.register_forward_hook(lambda mod, args, out: seen.append(out[1].detach()))
    try:
        predictions(model)
    finally:
        hook.remove()
    top2 = seen[-1].float().topk(2, dim=-1).values  # the last step's logits (B, L, 2)
    assert (top2[..., 0] - top2[..., 1]).min().item() > 1e-3


def test_maze_checkpoint_maps_to_the_maze_task(imported, tmp_path):
    """An official Maze build (tokens "# SGo" = 1..5, as dis's) becomes task `maze` on the
    Maze-Hard CSV layout; `dis eval` gives the official token and exact accuracy, and the maze
    evaluator agrees on exact accuracy."""
    import tomllib

    run = imported["trm_maze"]
    recipe = tomllib.loads((run / "recipe.toml").read_text())
    assert recipe["task"] == {"name": "maze", "config": {"rows": 7, "cols": 7, "csv_test": "data/test.csv",
                                                         "csv_train": "data/test.csv"}}
    # The CSV dis reads back holds the official test arrays, token for token.
    model = dis_core.load(run, device="cpu")
    split = model.task.dataset("test")
    batch = split.get(np.arange(len(split)))
    data = FIXTURES / "trm_maze" / "data" / "test"
    assert np.array_equal(batch["inputs"], np.load(data / "all__inputs.npy"))
    assert np.array_equal(batch["labels"], np.load(data / "all__labels.npy"))
    rec = official("trm_maze")
    assert main(["eval", str(run), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert metrics["exact/accuracy"] == pytest.approx(rec["metrics"]["all"]["accuracy"], abs=1e-6)
    assert metrics["exact/exact_accuracy"] == metrics["maze/exact_accuracy"] == pytest.approx(rec["metrics"]["all"]["exact_accuracy"])
    assert metrics["maze/count"] == len(split) == 6
    # A model that answers with walls, open cells, S and G, not a constant.
    assert {1, 2, 3, 4} <= set(np.unique(predictions(model)[0]).tolist())


def test_maze_data_that_is_not_a_maze_build_is_a_data_error(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "trm_maze", src, ignore=shutil.ignore_patterns("official_eval.pt"))
    inputs = np.load(src / "data" / "test" / "all__inputs.npy")
    inputs[0, 0] = 5  # 'o' in a question
    np.save(src / "data" / "test" / "all__inputs.npy", inputs)
    with pytest.raises(UserError, match=r"all__inputs.npy: tokens outside 1..4 \('# SG'\)"):
        checkpoint_io.import_official(src, tmp_path / "run", data=src / "data")


def test_arc_identifiers_are_the_official_table(imported):
    """The imported ARC model reads the official build itself: its puzzle table has one row per
    official identifier, and every test example carries the identifier the official loader gave it."""
    model = dis_core.load(imported["trm_arc"], device="cpu")
    names = json.loads((FIXTURES / "trm_arc" / "data" / "identifiers.json").read_text())
    assert model.puzzle_emb.weights.shape[0] == len(names) == model.spec.num_puzzle_ids
    saved = checkpoint_io.model_state(torch.load(FIXTURES / "trm_arc" / "step_6"))
    assert torch.equal(model.puzzle_emb.weights, saved["inner.puzzle_emb.weights"])


def test_run_json_records_provenance_and_what_was_not_carried(imported):
    info = json.loads((imported["trm_sudoku"] / "run.json").read_text())["imported"]
    assert info["sha256"] == checkpoint_io.sha256(FIXTURES / "trm_sudoku" / "step_6")
    assert info["compiled_keys"] is True
    assert info["mapping"]["arch.H_cycles"] == "backbone.config.T"
    assert info["mapping"]["arch.halt_max_steps"] == "supervision.n_sup"
    assert "epochs" in info["unmapped"] and "project_name" in info["unmapped"]
    assert info["tensors"]["inner.L_level.layers.0.self_attn.qkv_proj.weight"] == "backbone.net.blocks.0.attn.qkv.weight"


def test_uncompiled_keys_import_alike(tmp_path, imported):
    """A checkpoint saved without torch.compile (keys `model.inner.*`) gives the same model."""
    src = tmp_path / "plain"
    shutil.copytree(FIXTURES / "trm_sudoku", src, ignore=shutil.ignore_patterns("official_eval.pt"))
    state = torch.load(src / "step_6")
    torch.save({k.removeprefix("_orig_mod."): v for k, v in state.items()}, src / "step_6")
    checkpoint_io.import_official(src, tmp_path / "run", data=src / "data")
    a = dis_core.load(tmp_path / "run", device="cpu").backbone.state_dict()
    b = dis_core.load(imported["trm_sudoku"], device="cpu").backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def _broken_copy(tmp_path: Path, edit_state=None, edit_config=None) -> Path:
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "trm_sudoku", src, ignore=shutil.ignore_patterns("official_eval.pt"))
    if edit_state:
        state = torch.load(src / "step_6")
        edit_state(state)
        torch.save(state, src / "step_6")
    if edit_config:
        text = (src / "all_config.yaml").read_text()
        (src / "all_config.yaml").write_text(edit_config(text))
    return src


@pytest.mark.parametrize("edit, needle", [
    (dict(edit_config=lambda t: t.replace("TinyRecursiveReasoningModel_ACTV1", "MysteryNet")), "unknown architecture 'MysteryNet'"),
    (dict(edit_state=lambda s: s.pop("_orig_mod.model.inner.lm_head.weight")), "missing keys model.inner.lm_head.weight"),
    (dict(edit_state=lambda s: s.__setitem__("_orig_mod.model.inner.extra.weight", torch.zeros(2))), "unexpected keys model.inner.extra.weight"),
    (dict(edit_config=lambda t: t.replace("hidden_size: 16", "hidden_size: 32")), "shapes differ"),
    (dict(edit_state=lambda s: s.__setitem__("_orig_mod.model.inner.puzzle_emb.weights", torch.zeros(5, 16))), "5 puzzle identifiers" ),
])
def test_bad_checkpoints_exit_2_naming_the_key(edit, needle, tmp_path, capsys):
    src = _broken_copy(tmp_path, **edit)
    code = main(["import", str(src / "step_6"), "--out", str(tmp_path / "run"), "--data", str(src / "data")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    if needle == "5 puzzle identifiers":
        assert "puzzle_emb.weights has shape (5, 16)" in err and "1 puzzle identifiers" in err
    else:
        assert needle in err, err


def test_missing_config_and_data_are_user_errors(tmp_path):
    src = _broken_copy(tmp_path)
    (src / "all_config.yaml").unlink()
    with pytest.raises(UserError, match="all_config.yaml: missing"):
        checkpoint_io.import_official(src / "step_6", tmp_path / "a", data=src / "data")
    src2 = _broken_copy(tmp_path / "two")
    with pytest.raises(UserError, match="no identifiers.json"):
        checkpoint_io.import_official(src2 / "step_6", tmp_path / "b", data=tmp_path)


@pytest.mark.parametrize("name", CASES)
def test_export_official_gives_back_the_official_checkpoint(name, imported, tmp_path):
    """dis -> official: every tensor of the original file, under its own key, bit for bit, so the
    official loader (strict load_state_dict) evaluates it to the official numbers above."""
    assert main(["export", str(imported[name]), "--format", "official", "--out", str(tmp_path / "o")]) == 0
    theirs = torch.load(step_file(name))
    ours = torch.load(tmp_path / "o" / step_file(name).name.removesuffix(".pth"))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    import yaml

    cfg, ref = (yaml.safe_load(p.read_text()) for p in (tmp_path / "o" / "all_config.yaml", FIXTURES / name / "all_config.yaml"))
    for key in ("hidden_size", "num_heads", "H_cycles", "L_cycles", "L_layers", "halt_max_steps", "puzzle_emb_ndim", "name"):
        assert cfg["arch"][key] == ref["arch"][key], key
    # ... and it imports again to the same predictions.
    checkpoint_io.import_official(tmp_path / "o", tmp_path / "again", data=FIXTURES / name / "data")
    a, b = (predictions(dis_core.load(p, device="cpu"))[0] for p in (imported[name], tmp_path / "again"))
    assert np.array_equal(a, b)


def test_portable_folder_loads_back(imported, tmp_path):
    out = tmp_path / "portable"
    assert main(["export", str(imported["trm_arc"]), "--format", "portable", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "recipe.toml", "run.json", "README.md"}
    card = (out / "README.md").read_text()
    assert "dis_core.load" in card and "arc" in card and "Provenance" in card
    a = predictions(dis_core.load(imported["trm_arc"], device="cpu"))
    b = predictions(dis_core.load(out, device="cpu"))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert main(["eval", str(out), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "arc" / "submission.json").read_text()) == official("trm_arc")["submission"]


def test_golden_mapping_round_trips():
    """dis_name and official_name are inverse on every kind of tensor the models hold."""
    for key in ("inner.L_level.layers.1.self_attn.qkv_proj.weight", "inner.embed_tokens.embedding_weight",
                "inner.timestep_embed.embedding_weight", "inner.lm_head.weight", "inner.q_head.bias", "inner.H_init",
                "inner.L_level.layers.0.mlp.down_proj.weight"):
        assert checkpoint_io.official_name(checkpoint_io.dis_name(key)) == key
    for key in ("inner.H_level.layers.0.mlp.gate_up_proj.weight", "inner.L_level.layers.0.self_attn.o_proj.weight"):
        assert checkpoint_io.official_name(checkpoint_io.dis_name(key, trm=False), trm=False) == key
    assert checkpoint_io.dis_name("inner.puzzle_emb.weights") is None


# ------------------------------------------------------------------ dis -> official

DIS_EXPORT = FIXTURES / "dis_export_arc"
# The portable folder's recipe names the ARC build by a path of the recording machine.
ARC_DATA = f'task.config.reference_dir="{FIXTURES / "trm_arc" / "data"}"'


def test_dis_trained_model_evaluates_in_the_official_code_as_in_dis(tmp_path):
    """The reverse proof: a model trained by `dis run`, exported with `--format official`, gave
    in the official code (its strict load_checkpoint, its evaluate, its ARC evaluator) the
    predictions, exact accuracy, pass@K and submission.json that `dis eval` gives on the model."""
    rec = official("dis_export_arc")
    # 1. What this dis exports now is, tensor for tensor, the file the official code evaluated.
    assert main(["export", str(DIS_EXPORT / "model"), "--format", "official", "--out", str(tmp_path / "o"), "--set", ARC_DATA]) == 0
    assert make_official_ckpt.tensor_digests(torch.load(tmp_path / "o" / f"step_{rec['step']}")) == rec["exported"]
    # 2. `dis eval` on the dis model: the official metrics and votes.
    assert main(["eval", str(DIS_EXPORT / "model"), "--set", ARC_DATA, "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    for k in (1, 2, 5):
        assert metrics[f"arc/pass@{k}"] == rec["metrics"][f"ARC/pass@{k}"]
    assert metrics["exact/exact_accuracy"] == pytest.approx(rec["metrics"]["all"]["exact_accuracy"])
    assert metrics["exact/accuracy"] == pytest.approx(rec["metrics"]["all"]["accuracy"], abs=1e-6)
    assert json.loads((tmp_path / "ev" / "arc" / "submission.json").read_text()) == rec["submission"]
    # 3. Per example, in the official test split's order.
    preds, q, ids = predictions(dis_core.load(DIS_EXPORT / "model", set_overrides=[ARC_DATA], device="cpu"))
    keep = real_rows("arc", rec, len(preds))
    out = rec["outputs"]
    assert np.array_equal(ids, out["puzzle_identifiers"].numpy()[keep])
    assert np.array_equal(preds, out["preds"].numpy()[keep])
    # A model that answers with several colours (tokens 2..11), not a constant, which any wiring would match.
    assert len(np.unique(preds[preds >= 2])) >= 3
    ref_q = out["q_halt_logits"][keep]
    assert (q - ref_q).abs().max().item() <= 1e-4 * max(1.0, ref_q.abs().max().item())


def test_dis_checkpoint_maps_to_the_step_embedding_model(imported):
    """DIS's ACTV5: dis's trm with the step embedding, its previous answer fed back, a fixed
    number of steps; `step_N.pth` names the step."""
    info = json.loads((imported["dis_sudoku"] / "run.json").read_text())["imported"]
    assert info["architecture"].endswith("TinyRecursiveReasoningModel_ACTV5") and info["step"] == 80
    assert info["tensors"]["inner.timestep_embed.embedding_weight"] == "backbone.embed.step.weight"
    model = dis_core.load(imported["dis_sudoku"], device="cpu")
    assert model.recipe.supervision.step_input == "prediction" and model.recipe.halting.name == "fixed"
    assert model.step == 80


OFFICIAL_TRM = os.environ.get("DIS_OFFICIAL_TRM")
OFFICIAL_DIS = os.environ.get("DIS_OFFICIAL_DIS")


@pytest.mark.official
def test_regenerated_fixtures_match_the_committed_ones(tmp_path):
    """Opt-in (`pytest -m official` with DIS_OFFICIAL_TRM, and DIS_OFFICIAL_DIS for dis_sudoku):
    record the fixtures afresh from the official code and check that the committed ones hold the
    same checkpoints and evaluations."""
    assert OFFICIAL_TRM, "set DIS_OFFICIAL_TRM to a checkout of SamsungSAILMontreal/TinyRecursiveModels"
    make_official_ckpt.record_all(Path(OFFICIAL_TRM), tmp_path, Path(OFFICIAL_DIS) if OFFICIAL_DIS else None)
    names = [n for n in CASES if OFFICIAL_DIS or n != "dis_sudoku"]
    for name in names:
        fresh, kept = torch.load(tmp_path / name / step_file(name).name), torch.load(step_file(name))
        assert set(fresh) == set(kept) and all(torch.allclose(fresh[k], kept[k], atol=1e-5) for k in kept)
    for name in names + ["dis_export_arc"]:
        a, b = official(name), torch.load(tmp_path / name / "official_eval.pt", weights_only=False)
        assert torch.equal(a["outputs"]["preds"], b["outputs"]["preds"])


def test_init_from_fine_tunes_an_imported_model(imported, tmp_path, capsys):
    """`dis run --init-from`: training starts from the imported weights (the first evaluation of a
    zero-step-like run would equal the import's), and runs."""
    run = imported["trm_sudoku"]
    recipe = run / "recipe.toml"
    code = main(["run", str(recipe), "--out", str(tmp_path / "ft"), "--init-from", str(FIXTURES / "trm_sudoku" / "step_6"),
                 "--set", "train.steps=2", "--set", "train.threads=1", "--set", "train.preflight=false",
                 "--set", f"task.config.csv_test=\"{run / 'data' / 'test.csv'}\"", "--set", f"task.config.csv_train=\"{run / 'data' / 'test.csv'}\""])
    assert code == 0
    assert '"puzzle_table": "loaded"' in capsys.readouterr().err
    start = dis_core.load(run, device="cpu").backbone.state_dict()
    tuned = dis_core.load(tmp_path / "ft", device="cpu").backbone.state_dict()
    moved = max((tuned[k].float() - start[k].float()).abs().max().item() for k in start if start[k].is_floating_point())
    assert 0 < moved < 0.05  # two small steps away from the imported weights, not from a fresh init


def test_init_from_resets_a_puzzle_table_of_another_size_to_the_mean_row(imported, tmp_path):
    from dis_core.step.solver import Solver
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe

    src = _broken_copy(tmp_path, edit_state=lambda s: s.__setitem__("_orig_mod.model.inner.puzzle_emb.weights",
                                                                    torch.arange(80.0).reshape(5, 16)))
    registry = load_registry()
    resolved = load_recipe(imported["trm_sudoku"] / "recipe.toml", registry, ["loggers=[]"])
    solver = Solver.build(resolved, registry, tmp_path / "data", device=torch.device("cpu"))
    done = checkpoint_io.init_weights(solver, src / "step_6")
    assert done["puzzle_table"].startswith("5 rows -> 1")
    assert torch.equal(solver.puzzle_emb.weights[0], torch.arange(80.0).reshape(5, 16).mean(0))
