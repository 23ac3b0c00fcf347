"""A new kind of component that the training loop consults is its slot row, its Protocol and one
call site (issue 18, "Done when"). The kind here exists for the test only: a `curriculum`, which
chooses the training examples that enter the slots from the data stream. Its row is added to the
slot table of a fresh registry, one plugin registers two curricula, and the one call site is a
Trainer subclass overriding the method that takes the next examples. Everything else (recipe
resolution and validation, `dis plugins`, training, run.json, checkpoints, resuming, `dis check`)
handles the new kind with no edit."""

from __future__ import annotations

import json
from typing import Protocol, runtime_checkable

import attrs
import numpy as np
import pytest
import torch

from dis_core.tools import cli
from dis_core import hookimpl
from dis_core.contract.errors import RecipeError
from dis_core.contract.interfaces import Stream
from dis_core.tools.kit import check_recipe, format_rows
from dis_core.wiring.plugins import load_registry
from dis_core.wiring.recipe import load_recipe
from dis_core.contract.slots import SLOTS, Slot
from dis_core.loop.trainer import Trainer

from conftest import tiny_recipe


# ------------------------------------------------------------------ the kind: a Protocol and a slot row


@runtime_checkable
class Curriculum(Protocol):
    """Chooses which training examples enter the slots next."""

    def take(self, stream: Stream, k: int) -> np.ndarray:
        """(k,) int64 indices of the training split, drawn from this rank's `stream`."""
        ...


CURRICULUM = Slot(key="curriculum", kind="curriculum", hook="register_curricula", protocol=Curriculum,
                  doc="Register curricula. Factory returns a `Curriculum`.", default="everything")
SLOTS_WITH_CURRICULUM = (*SLOTS, CURRICULUM)


# ------------------------------------------------------------------ a plugin with two curricula


@attrs.frozen(kw_only=True)
class Everything:
    """The stream as it is."""

    def take(self, stream, k):
        return stream.take(k)


@attrs.frozen(kw_only=True)
class GrowingConfig:
    start: int = 4  # examples available at first: the first `start` of the split
    growth: float = 0.25  # more available per example taken


class Growing:
    """The first `start + growth * taken` examples of the split only, folded in from the stream."""

    def __init__(self, config: GrowingConfig, size: int, rank: int, world_size: int):
        self.config, self.size, self.rank, self.world_size = config, size, rank, world_size
        self.taken = 0  # examples this rank has taken: the state a resumed run must get back

    def take(self, stream, k):
        limit = min(self.size, int(self.config.start + self.config.growth * self.taken))
        self.taken += k
        return stream.take(k) % limit

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = state["taken"]


class CurriculumPlugin:
    @hookimpl
    def register_curricula(self, register):
        register("everything", Everything, lambda config, ctx: config)
        register("growing", GrowingConfig,
                 lambda config, ctx: Growing(config, len(ctx.task.dataset("train")), ctx.rank, ctx.world_size))


# ------------------------------------------------------------------ the one call site


class CurriculumTrainer(Trainer):
    def _examples(self, k):
        return self.solver.components.curriculum.take(self.state.stream, k)


@pytest.fixture
def registry():
    return load_registry(extra_plugins=(CurriculumPlugin(),), slots=SLOTS_WITH_CURRICULUM)


GROWING = '\n[curriculum]\nname = "growing"\nconfig = { start = 4, growth = 0.25 }\n'


def _losses(run) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if r["split"] == "train"]


# ------------------------------------------------------------------ everything else copes


def test_the_recipe_resolves_and_checks_the_new_kind(tmp_path, registry):
    resolved = load_recipe(tiny_recipe(tmp_path, extra=GROWING), registry)
    assert resolved.component("curriculum") == ("growing", GrowingConfig(start=4, growth=0.25))
    assert resolved.to_dict()["curriculum"] == {"name": "growing", "config": {"start": 4, "growth": 0.25}}
    assert load_recipe(tiny_recipe(tmp_path, name="plain.toml"), registry).component("curriculum")[0] == "everything"
    with pytest.raises(RecipeError, match=r"extra fields found \(strat\) @ \$\.curriculum\.config"):
        load_recipe(tiny_recipe(tmp_path, extra=GROWING), registry, ["curriculum.config.strat=2"])


def test_dis_plugins_lists_the_new_kind(registry, monkeypatch, capsys):
    monkeypatch.setattr("dis_core.wiring.plugins.load_registry", lambda **kwargs: registry)
    assert cli.main(["plugins"]) == 0
    listed = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert ["curriculum", "everything"] in listed and ["curriculum", "growing"] in listed


def test_the_run_trains_through_the_call_site_and_records_the_kind(tmp_path, registry):
    resolved = load_recipe(tiny_recipe(tmp_path, steps=4, extra=GROWING), registry)
    trainer = CurriculumTrainer(resolved, registry, tmp_path / "run", data_dir=tmp_path / "data")
    growing = trainer.solver.components.curriculum
    assert (growing.rank, growing.world_size) == (0, 1)  # its factory learnt the process's place
    summary = trainer.fit(registry)
    assert summary["step"] == 4
    # Refills at steps 1 and 4 (fixed halting, n_sup 3): at step 4, 8 taken, the first 4 + 2 only.
    assert growing.taken == 16 and int(trainer.state.carry.batch["example_ids"].max()) < 6
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert {"path": "curriculum", "kind": "curriculum", "name": "growing",
            "plugin": registry.get("curriculum", "growing").plugin} in info["components"]
    assert info["recipe"]["curriculum"]["name"] == "growing"
    # Without the call site the same recipe trains on the whole split: the site is what consults it.
    plain = Trainer(resolved, registry, tmp_path / "plain", data_dir=tmp_path / "data")
    plain.fit(registry)
    assert plain.solver.components.curriculum.taken == 0 and int(plain.state.carry.batch["example_ids"].max()) >= 6


def test_checkpoints_hold_its_state_and_a_resumed_run_continues_it(tmp_path, registry):
    extra = ["train.steps=8", "train.checkpoint_interval=2"]
    resolved = load_recipe(tiny_recipe(tmp_path, extra=GROWING), registry, extra)
    CurriculumTrainer(resolved, registry, tmp_path / "whole", data_dir=tmp_path / "data").fit(registry)
    CurriculumTrainer(resolved, registry, tmp_path / "cut", data_dir=tmp_path / "data").fit(registry, stop_after=3)
    mine = torch.load(tmp_path / "cut" / "checkpoints" / "step_2" / "dis_rank0.pt", weights_only=False)
    assert mine["components"] == {"curriculum": {"taken": 8}}
    resumed = CurriculumTrainer(resolved, registry, tmp_path / "cut", data_dir=tmp_path / "data", resume=True)
    assert resumed.resumed_from == "step_2" and resumed.solver.components.curriculum.taken == 8
    resumed.fit(registry)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")


def test_dis_check_reports_the_new_kind(tmp_path, registry):
    rows = check_recipe(load_recipe(tiny_recipe(tmp_path, extra=GROWING), registry), registry, data_dir=tmp_path / "data")
    assert all(r.ok for r in rows), format_rows(rows)
    (row,) = [r for r in rows if r.kind == "curriculum"]
    assert row.name == "growing" and row.note == "built: a Growing, a Curriculum"
