"""Tiny CPU training runs: outputs, learning signal, resume equality, crash-safe checkpoints."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from dis_core.loop import checkpoint
from dis_core.wiring.recipe import load_recipe
from dis_core.loop.schedule import lr_at
from dis_core.loop.trainer import Trainer

from conftest import tiny_recipe


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if r["split"] == "train"]


def _train(tmp_path, registry, out, overrides=(), **fit_kw):
    resolved = load_recipe(tiny_recipe(tmp_path), registry, list(overrides))
    trainer = Trainer(resolved, registry, out, data_dir=tmp_path / "data", resume=fit_kw.pop("resume", False))
    return trainer, trainer.fit(registry, **fit_kw)


def test_run_writes_everything(tmp_path, registry):
    out = tmp_path / "run"
    trainer, summary = _train(tmp_path, registry, out, ["train.eval_interval=3"])
    for name in ("recipe.toml", "run.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run.json").read_text())
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"].startswith(torch.__version__[:4])
    assert {"kind": "backbone", "name": "trm"}.items() <= next(p for p in info["plugins"] if p["name"] == "trm").items()
    assert info["params"] == summary["params"] > 0
    rep = info["targets_report"]
    assert rep["monotone_share"] == 1.0 and rep["hamming@1"] >= rep["hamming@3"] == 0.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert "nqueens/valid_solution_rate" in evals[-1] and "exact/hamming@3" in evals[-1]
    assert summary["nqueens/count"] == 12  # every test example evaluated once
    # fixed halting: 8 slots x 3 calls per step x 6 steps; fresh examples every 3 steps
    assert summary["cost/network_calls"] == 8 * 3 * 6 and summary["cost/examples"] == 16
    assert checkpoint.find_latest(out / "checkpoints", 1) == "step_6"


def test_loss_goes_down(tmp_path, registry):
    _, _ = _train(tmp_path, registry, tmp_path / "run", ["train.steps=60", "train.optimizer.config.lr=3e-3"])
    losses = [l for _, l in _losses(tmp_path / "run")]
    assert sum(losses[-6:]) / 6 < 0.7 * sum(losses[:6]) / 6


def test_seed_fixes_the_run(tmp_path, registry):
    _train(tmp_path, registry, tmp_path / "a")
    _train(tmp_path, registry, tmp_path / "b")
    _train(tmp_path, registry, tmp_path / "c", ["train.seed=1"])
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert _losses(tmp_path / "a") != _losses(tmp_path / "c")


@pytest.mark.parametrize("halting", ["fixed", "act"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, registry, halting):
    extra = ["train.checkpoint_interval=4", "train.steps=10", f"halting.name={halting}"]
    if halting == "act":
        extra += ["targets.name=final"]
    _train(tmp_path, registry, tmp_path / "full", extra)
    # A run killed after step 6: its last checkpoint is step 4.
    _train(tmp_path, registry, tmp_path / "killed", extra, stop_after=6)
    assert checkpoint.find_latest(tmp_path / "killed" / "checkpoints", 1) == "step_4"
    trainer, _ = _train(tmp_path, registry, tmp_path / "killed", extra, resume=True)
    assert trainer.resumed_from == "step_4"
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")


def test_interrupted_checkpoint_write_is_ignored(tmp_path, registry):
    out = tmp_path / "run"
    _train(tmp_path, registry, out, ["train.checkpoint_interval=3"])
    ckpts = out / "checkpoints"
    # A write killed half-way: a temp dir without rank files, and a step dir missing its rank file.
    (ckpts / ".tmp-step_9").mkdir()
    shutil.copytree(ckpts / "step_6", ckpts / "step_8")
    (ckpts / "step_8" / "dis_rank0.pt").unlink()
    assert checkpoint.find_latest(ckpts, 1) == "step_6"
    (ckpts / "latest").unlink()  # even the pointer lost: fall back to the newest complete step
    assert checkpoint.find_latest(ckpts, 1) == "step_6"


def test_lr_schedule_matches_reference():
    assert lr_at(1, 1.0, 2000, 10_000, "constant", 1.0) == pytest.approx(1 / 2000)
    assert lr_at(2000, 1.0, 2000, 10_000, "constant", 1.0) == 1.0
    assert lr_at(10_000, 1.0, 0, 10_000, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_at(5_000, 1.0, 0, 10_000, "cosine", 0.0) == pytest.approx(0.5)


def test_step_weights_and_step_input_options(tmp_path, registry):
    _train(tmp_path, registry, tmp_path / "a")
    _train(tmp_path, registry, tmp_path / "b", ["supervision.step_weights=linear"])
    _train(tmp_path, registry, tmp_path / "c", ["supervision.step_input=question"])
    a, b, c = (_losses(tmp_path / n) for n in "abc")
    assert a[0][1] != b[0][1]  # step 1 has weight 2/(N+1) != 1
    assert a[0] == c[0] and a[1] != c[1]  # same first step, different input afterwards


def test_act_with_continue_loss_counts_the_extra_forward(tmp_path, registry):
    common = ["targets.name=final", "halting.name=act", "train.steps=4"]
    _, plain = _train(tmp_path, registry, tmp_path / "plain", common)
    _, cont = _train(tmp_path, registry, tmp_path / "cont", common + ["halting.config.continue_loss=true"])
    # every slot runs a step each optimizer step; the Q-continue target doubles the forward calls
    assert plain["cost/network_calls"] == 8 * 3 * 4
    assert cont["cost/network_calls"] == 2 * plain["cost/network_calls"]
    assert _losses(tmp_path / "plain")[0] != _losses(tmp_path / "cont")[0]


def test_ema_weights_are_saved_and_used_for_evaluation(tmp_path, registry):
    trainer, _ = _train(tmp_path, registry, tmp_path / "ema", ["train.ema=0.9", "train.steps=4"])
    saved = torch.load(tmp_path / "ema" / "checkpoints" / "step_4" / "ema_weights.pt", weights_only=False)
    live = trainer.engine.module.state_dict()
    name = next(k for k in saved if k.endswith("lm_head.weight"))
    assert saved[name].shape == live[name].shape and not torch.equal(saved[name], live[name])


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_gradient_clipping_is_what_the_recipe_says(tmp_path, registry, clip):
    """DeepSpeed clips at 1.0 when the key is missing; the effective value must be the recipe's."""
    resolved = load_recipe(tiny_recipe(tmp_path), registry, [f"train.grad_clip={clip}"])
    trainer = Trainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data")
    assert trainer.engine.gradient_clipping() == clip


def test_unused_q_head_is_left_untouched(tmp_path, registry):
    """DIS (fixed halting) never trains the Q-head: weight decay must not pull it towards 0."""
    trainer, _ = _train(tmp_path, registry, tmp_path / "run", ["train.optimizer.config.weight_decay=0.5"])
    head = trainer.solver.backbone.q_head
    assert torch.equal(head.bias.detach(), torch.full((2,), -5.0))
    assert not any(p.requires_grad for p in head.parameters())
    # ...while ACT trains it.
    trainer, _ = _train(tmp_path, registry, tmp_path / "act", ["halting.name=act", "targets.name=final"])
    assert not torch.equal(trainer.solver.backbone.q_head.bias.detach(), torch.full((2,), -5.0))


@pytest.mark.parametrize("halting", ["fixed", "act"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, registry, halting):
    """micro_batch_size changes memory, not training: same losses, refills, halting and weights
    as the unaccumulated run, up to fp32 rounding (bf16, where `auto` picks it, rounds coarser)."""
    extra = ["train.steps=8", "train.precision=fp32"] + (["halting.name=act", "targets.name=final", "supervision.step_input=question"] if halting == "act" else [])
    whole, _ = _train(tmp_path, registry, tmp_path / "whole", extra)
    split, _ = _train(tmp_path, registry, tmp_path / "split", [*extra, "train.micro_batch_size=2"])
    assert split.engine.gradient_accumulation_steps() == 4 and whole.engine.gradient_accumulation_steps() == 1
    for (s1, l1), (s2, l2) in zip(_losses(tmp_path / "whole"), _losses(tmp_path / "split")):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    assert torch.equal(whole.state.carry.steps, split.state.carry.steps) and torch.equal(whole.state.carry.halted, split.state.carry.halted)
    assert whole.state.ledger.examples == split.state.ledger.examples
    ours, theirs = whole.engine.module.state_dict(), split.engine.module.state_dict()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5


def test_micro_batch_must_divide_the_share_of_each_process(tmp_path, registry):
    from dis_core.contract.errors import UserError

    with pytest.raises(UserError, match="micro_batch_size=3 does not divide the 8 slots"):
        _train(tmp_path, registry, tmp_path / "run", ["train.micro_batch_size=3"])


def test_compiled_backbone_trains_like_the_eager_one(tmp_path, registry, precision="bf16"):
    """train.compile: the reasoning modules run through torch.compile; the run trains to the
    same losses up to the fused kernels' rounding, with finite gradients (compiling the whole
    backbone in bf16 gave non-finite embedding gradients), and checkpoints keep their names.
    bf16 only: it is the combination train.compile is for, and compiling costs ~30 s a test."""
    extra = ["train.steps=4", f"train.precision={precision}"]
    eager, _ = _train(tmp_path, registry, tmp_path / "eager", extra)
    compiled, _ = _train(tmp_path, registry, tmp_path / "compiled", [*extra, "train.compile=true"])
    net = compiled.engine.module.backbone.net
    assert net._compiled_call_impl is not None and compiled.engine.module.backbone.embed._compiled_call_impl is None
    tol = 1e-4 if precision == "fp32" else 2e-2
    for (s1, l1), (s2, l2) in zip(_losses(tmp_path / "eager"), _losses(tmp_path / "compiled")):
        assert s1 == s2 and math.isfinite(l2) and l1 == pytest.approx(l2, rel=tol)
    ours, theirs = eager.engine.module.state_dict(), compiled.engine.module.state_dict()
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 10 * tol
