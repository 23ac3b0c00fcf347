"""The model as one object (dis_core/step/solver.py, issue 18): training, evaluation, `dis_core.load`,
trajectory pictures, `dis bench` and `dis check` all run the `Solver` the recipe builds, in the
precision it decided once; the trainer's attributes are read by no other module."""

from __future__ import annotations

import ast
import contextlib

import pytest
import torch
from structlog.testing import capture_logs

import dis_core
from dis_core.loop import evaluation
from dis_core.tools.bench import time_eval
from dis_core.tools.kit import check_recipe, format_rows
from dis_core.wiring.recipe import load_recipe
from dis_core.step.devices import native_bf16
from dis_core.step.solver import Solver
from dis_core.loop.trainer import Trainer

from conftest import ROOT, tiny_recipe


@contextlib.contextmanager
def forwards(monkeypatch):
    """Every call of a backbone that `Solver.build` built, as (phase, autocast dtype or None):
    phase "train" or "eval" by the backbone's mode; the dtype the call's matmuls run in."""
    built, seen = [], []
    build = Solver.build

    def recording(cls, *args, **kwargs):
        solver = build(*args, **kwargs)
        built.append(solver.backbone)
        return solver

    def hook(module, args):
        if any(module is b for b in built):
            on = torch.is_autocast_enabled("cpu")
            seen.append(("train" if module.training else "eval", torch.get_autocast_dtype("cpu") if on else None))

    monkeypatch.setattr(Solver, "build", classmethod(recording))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", None)])
def test_dis_check_runs_the_recipes_precision(tmp_path, registry, monkeypatch, precision, dtype):
    resolved = load_recipe(tiny_recipe(tmp_path), registry, [f"train.precision={precision}"])
    with forwards(monkeypatch) as seen:
        rows = check_recipe(resolved, registry, data_dir=tmp_path / "data")
    assert all(r.ok for r in rows), format_rows(rows)
    assert {phase for phase, _ in seen} == {"train", "eval"}  # the training step and the evaluation rollout
    assert {d for _, d in seen} == {dtype}
    (evaluated,) = [r for r in rows if (r.kind, r.name) == ("step", "evaluation")]
    assert f"in {precision}" in evaluated.note


def test_every_path_runs_a_bf16_run_in_bf16(tmp_path, registry, monkeypatch):
    resolved = load_recipe(tiny_recipe(tmp_path, steps=2), registry, ["train.precision=bf16", "train.eval_trajectories=1"])
    with forwards(monkeypatch) as seen:
        Trainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data").fit(registry)  # training, evaluation, pictures
        trained = len(seen)
        model = dis_core.load(tmp_path / "run", data_dir=tmp_path / "data", registry=registry)
        assert model.solver.bf16 and model.backbone is model.solver.backbone
        model.evaluate(limit=4)
        model.predict([["....."] * 5])  # an empty 5x5 board
        model.draw_trajectories(1, tmp_path / "pics")
        time_eval(model.solver, 1)  # dis bench's evaluation timing
    assert {p for p, _ in seen[:trained]} == {"train", "eval"} and {p for p, _ in seen[trained:]} == {"eval"}
    assert {d for _, d in seen} == {torch.bfloat16}


def test_a_loaded_model_holds_the_checkpoints_weights_in_its_solver(tmp_path, registry):
    resolved = load_recipe(tiny_recipe(tmp_path, steps=2), registry)
    trainer = Trainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data")
    trainer.fit(registry)
    model = dis_core.load(tmp_path / "run", data_dir=tmp_path / "data", registry=registry)
    auto = "bf16" if native_bf16(torch.device("cpu")) else "fp32"  # train.precision = "auto"
    assert isinstance(model.solver, Solver) and model.solver.precision == trainer.solver.precision == auto
    mine, theirs = model.solver.backbone.state_dict(), trainer.solver.backbone.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not model.solver.backbone.training


def test_a_backbone_without_readouts_is_warned_about_once(tmp_path, registry, monkeypatch):
    monkeypatch.setattr(evaluation, "has_readouts", lambda backbone, readout: False)
    trainer = Trainer(load_recipe(tiny_recipe(tmp_path), registry), registry, tmp_path / "run", data_dir=tmp_path / "data")
    with capture_logs() as logs:
        for _ in range(3):
            assert not any("margin" in k for k in trainer.evaluate())
    assert [e["event"] for e in logs if "readout" in e["event"]] == ["the backbone has no readout before its step: no advantage_margin rows"]


def _trainer_reads(source: str) -> list[str]:
    """`name.attribute` of every attribute read off a Trainer in a module's source: off a name
    bound to `Trainer(...)`, or a parameter or variable called `trainer`."""
    tree = ast.parse(source)
    names = {"trainer"} | {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                           and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "Trainer"
                           for t in node.targets if isinstance(t, ast.Name)}
    return [f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names]


def test_no_other_module_reads_the_trainers_attributes():
    """Other modules construct a Trainer and call its loop (`fit`, `train_step`) and may read what
    its preflight decided (`preflight`: the micro-batch "auto" chose, for `dis bench`); what it is
    made of they take from the Solver and the TrainState."""
    reads = {str(path.relative_to(ROOT)): _trainer_reads(path.read_text())
             for path in sorted((ROOT / "dis_core").rglob("*.py")) if path.name != "trainer.py"}
    assert {name: r for name, r in reads.items() if set(r) - {"trainer.fit", "trainer.train_step", "trainer.preflight"}} == {}
    assert any(reads.values())  # some module drives a Trainer: the scan has calls to see
    # The scan sees reads off a name bound to Trainer(...) and off a parameter called trainer.
    seen = _trainer_reads("t = Trainer(a, b)\nt.solver.backbone\nt.fit()\ndef f(trainer):\n    return trainer.state.step\n")
    assert sorted(seen) == ["t.fit", "t.solver", "trainer.state"]
