"""Bounded checkpoints: retention of the newest N plus the best, and a disk-space check."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest

from dis_core.loop import checkpoint
from dis_core.contract.errors import CheckpointError
from dis_core.wiring.recipe import load_recipe
from dis_core.loop.trainer import Trainer

from conftest import tiny_recipe


def _trainer(tmp_path, registry, overrides):
    resolved = load_recipe(tiny_recipe(tmp_path), registry, list(overrides))
    return Trainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data")


def test_keeps_the_newest_and_the_best(tmp_path, registry):
    trainer = _trainer(tmp_path, registry, [
        "train.steps=6", "train.checkpoint_interval=1", "train.eval_interval=2",
        "train.keep_checkpoints=2", 'train.keep_best="exact/hamming@3"', 'train.keep_best_mode="min"',
    ])
    trainer.fit(registry)
    root = tmp_path / "run" / "checkpoints"
    kept = sorted(p.name for p in root.glob("step_*"))
    scores = {s: json.loads((root / s / "metrics.json").read_text())["exact/hamming@3"] for s in kept if (root / s / "metrics.json").exists()}
    assert "step_6" in kept and "step_5" in kept and len(kept) <= 3
    assert "step_6" in scores  # the last checkpoint is written after the final evaluation, with its metrics
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["exact/hamming@3"] for r in rows if r["split"] == "eval"}
    best = min(evals, key=lambda s: (evals[s], -s))
    assert f"step_{best}" in kept, (evals, kept)
    assert all(scores[s] == evals[int(s.split("_")[1])] for s in scores)


def test_keep_zero_keeps_every_checkpoint(tmp_path, registry):
    trainer = _trainer(tmp_path, registry, ["train.steps=4", "train.checkpoint_interval=1", "train.keep_checkpoints=0"])
    trainer.fit(registry)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [f"step_{i}" for i in range(1, 5)]


def test_no_space_is_a_clear_error_and_nothing_is_written(tmp_path, registry, monkeypatch):
    trainer = _trainer(tmp_path, registry, ["train.steps=2"])
    trainer.run.create()
    trainer.train_step()
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointError, match=r"not enough disk space for checkpoint step_1 .* MiB are free"):
        trainer.save_checkpoint()
    assert not list((tmp_path / "run" / "checkpoints").glob("*step_*"))
    assert checkpoint.find_latest(tmp_path / "run" / "checkpoints", 1) is None
