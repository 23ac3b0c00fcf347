"""Conformance checks for plugin authors: call them from your package's own pytest suite.

Each `check_*` function exercises one component the way the core will, and raises
`AssertionError` with a message naming what broke the contract of docs/hooks.md and
`dis_core/contract/interfaces.py`. dis's own tests/test_contracts.py runs the same functions over every
installed component, and `dis check RECIPE` runs them on the components of a recipe.

    from dis_core.testing import check_target_generator, context, toy_task

    def test_my_generator():
        task = toy_task()
        check_target_generator(build_my_generator(MyConfig(), context(task)), task)

`context(task)` is the `BuildContext` a factory receives, with a registry of the installed
plugins (or the one you pass) for factories that build other components; `toy_task()` is a
small task to test a generator, an evaluator or a backbone against without depending on any
other plugin.

A component written against an older plugin contract passes these checks where dis would run
it, with a `dis_core.DisContractWarning` saying what to add (an evaluator without `headline`);
run pytest with `-W error::dis_core.DisContractWarning` to make that a failure.
"""

from __future__ import annotations

import functools
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from dis_core.contract.checks import BatchCheck, FramesCheck, check_halt, check_metrics, check_per_slot_loss, check_state, check_step_output
from dis_core.step.data import check_groups, fetch
from dis_core.step.diagnostics import hamming_to_labels
from dis_core.contract import compat
from dis_core.contract.errors import PluginError
from dis_core.contract.interfaces import (
    IGNORE,
    Backbone,
    BuildContext,
    Dataset,
    EvalRecord,
    Evaluator,
    HaltingHead,
    HaltingStrategy,
    Task,
    TargetGenerator,
    TaskSpec,
)
from dis_core.wiring.plugins import load_registry

__all__ = [
    "check_backbone", "check_evaluator", "check_halting", "check_logger", "check_optimizer", "check_target_generator", "check_task",
    "context", "pick", "toy_task",
]


def context(task: Any = None, *, spec: TaskSpec | None = None, n_sup: int = 4, seed: int = 0, data_dir: Path | None = None,
            component: str = "", registry: Any = None, plugins: tuple = (), rank: int = 0, world_size: int = 1) -> BuildContext:
    """The `BuildContext` a factory receives: `task` and its spec (or a `spec` alone, for a
    backbone), a fresh temporary `data_dir` unless given (pass `tmp_path` in pytest), and the
    registry that `ctx.build` uses: `registry` if given, else the installed plugins plus
    `plugins` (plugin objects, as `load_registry(extra_plugins=...)` takes them)."""
    data_dir = Path(tempfile.mkdtemp(prefix="dis-testing-")) if data_dir is None else Path(data_dir)
    spec = task.spec if task is not None and spec is None else spec
    if registry is None:
        registry = load_registry(extra_plugins=tuple(plugins)) if plugins else installed_registry()
    return BuildContext(seed=seed, n_sup=n_sup, data_dir=data_dir, task=task, spec=spec, component=component,
                        registry=registry, rank=rank, world_size=world_size)


@functools.cache
def installed_registry():
    """The installed plugins' registry, loaded once per process for `context`: the plugins do
    not change while tests run, and loading them imports every plugin module."""
    return load_registry()


def pick(size: int, k: int = 8) -> np.ndarray:
    """Up to k distinct indices spread over [0, size), in descending order: the trainer asks in
    shuffled order, so a split must not assume ascending indices."""
    return np.unique(np.linspace(0, size - 1, min(k, size)).round().astype(np.int64))[::-1].copy()


def _conforms(obj: Any, kind: str, proto: type) -> None:
    """`obj` has every member of `proto` that has no default (AssertionError naming the ones it
    lacks); a deprecated member it lacks is a `DisContractWarning`, not a failure, as in a run."""
    missing = compat.check_and_warn(obj, kind, proto, f"{kind} {type(obj).__qualname__}")
    assert not missing, (f"{type(obj).__name__} is not a {proto.__name__} (see dis_core.contract.interfaces.{proto.__name__}): "
                         f"it lacks {', '.join(missing)}")


def _plugin_error(fn: Callable, *args, **kwargs):
    """Run a boundary check from dis_core.contract.checks, its PluginError turned into an AssertionError."""
    try:
        return fn(*args, **kwargs)
    except PluginError as exc:
        raise AssertionError(str(exc)) from None


# ------------------------------------------------------------------------------ a toy task


class _ToySplit:
    def __init__(self, size: int, spec: TaskSpec, seed: int):
        self.size, self.spec, self.seed = size, spec, seed

    def __len__(self) -> int:
        return self.size

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        L, V = self.spec.seq_len, self.spec.vocab_size
        rows = [np.random.default_rng([self.seed, int(i)]).integers(1, V, size=(2, L)) for i in idx]
        both = np.stack(rows).reshape(len(idx), 2, L)
        inputs, labels = both[:, 0], both[:, 1]
        inputs = np.where(np.arange(L) % 3 == 0, labels, inputs)  # a third of the cells given, as in a puzzle
        labels = np.where(np.arange(L) == L - 1, IGNORE, labels) if L > 1 else labels  # one unsupervised cell
        return {"inputs": inputs, "labels": labels, "puzzle_ids": np.zeros(len(idx), dtype=np.int64), "example_ids": idx.copy()}


class _ToyTask:
    def __init__(self, spec: TaskSpec, num_train: int, num_test: int, seed: int):
        self.spec = spec
        self._splits = {"train": _ToySplit(num_train, spec, seed), "test": _ToySplit(num_test, spec, seed + 1)}

    def dataset(self, split: str) -> _ToySplit:
        if split not in self._splits:
            raise ValueError(f"the toy task has splits 'train' and 'test', not {split!r}")
        return self._splits[split]


def toy_task(*, grid_shape: tuple[int, int] = (3, 4), vocab_size: int = 5, num_train: int = 16, num_test: int = 8, seed: int = 0) -> Task:
    """A small task of random grids (token 0 is PAD; a third of the cells are given in the
    question, the last cell is unsupervised): enough to test a generator, an evaluator or a
    backbone against."""
    spec = TaskSpec(vocab_size=vocab_size, seq_len=grid_shape[0] * grid_shape[1], grid_shape=grid_shape)
    return _ToyTask(spec, num_train, num_test, seed)


# ------------------------------------------------------------------------------ tasks


def check_task(task: Task | Callable[[], Task], *, rebuild: Callable[[], Task] | None = None, n_sup: int = 4) -> None:
    """A task keeps its contract: its spec is consistent; both splits are non-empty `Dataset`s
    whose `get` returns the four keys with the right shapes and integer dtypes, `example_ids ==
    indices`, tokens inside the vocabulary, something supervised; `get` is a pure function of the
    indices; the optional `groups()` and `solver_trajectory` are well formed.

    Pass a zero-argument factory instead of the task (or `rebuild=`) to also check that a second
    build with the same config gives the same data."""
    if not isinstance(task, Task) and callable(task):
        rebuild = task
        task = task()
    assert isinstance(task, Task), f"{type(task).__name__} is not a Task: it needs `spec` and `dataset(split)`"
    spec = task.spec
    assert isinstance(spec, TaskSpec), f"task.spec is a {type(spec).__name__}, not a dis_core.contract.interfaces.TaskSpec"
    V, L = spec.vocab_size, spec.seq_len
    assert V >= 2, f"spec.vocab_size = {V}: a task needs at least two token ids"
    assert L >= 1, f"spec.seq_len = {L}"
    assert spec.num_puzzle_ids >= 1, f"spec.num_puzzle_ids = {spec.num_puzzle_ids}: the blank id 0 is a row too"
    assert 0 <= spec.pad_id < V, f"spec.pad_id = {spec.pad_id} is outside the vocabulary [0, {V})"
    if spec.grid_shape is not None:
        rows, cols = spec.grid_shape
        assert rows * cols == L, f"spec.grid_shape {spec.grid_shape} covers {rows * cols} cells, spec.seq_len is {L}"
    for split in ("train", "test"):
        ds = task.dataset(split)
        assert isinstance(ds, Dataset), f"dataset({split!r}) returned a {type(ds).__name__}: it needs __len__ and get(indices)"
        assert len(ds) > 0, f"the {split} split is empty"
        idx = pick(len(ds))
        raw = ds.get(idx)
        _plugin_error(BatchCheck(spec, f"dataset({split!r}).get"), raw, idx)
        assert (raw["labels"] != IGNORE).any(), f"{split}: no label is supervised (every label is IGNORE)"
        again = ds.get(idx)
        assert again.keys() == raw.keys() and all(np.array_equal(again[k], raw[k]) for k in raw), (
            f"{split}: get() is not a pure function of the indices: the same indices gave other arrays"
        )
        one = ds.get(idx[:1])
        assert all(np.array_equal(one[k][0], raw[k][0]) for k in raw), (
            f"{split}: get() of one index differs from the same index asked for with others"
        )
        other = ds.get(idx[::-1].copy())
        for key, value in raw.items():
            assert other[key].shape[1:] == value.shape[1:] and other[key].dtype == value.dtype, (
                f"{split}: {key} changes its trailing shape or dtype from one batch to the next"
            )
        declare = getattr(ds, "groups", None)
        if callable(declare):
            groups = declare()
            if groups is not None:
                _plugin_error(check_groups, groups, len(ds), type(task).__name__)

    if callable(getattr(task, "solver_trajectory", None)):
        batch = fetch(task.dataset("train"), pick(len(task.dataset("train"))))
        frames = _plugin_error(FramesCheck(spec, n_sup, "solver_trajectory"), task.solver_trajectory(batch, n_sup), batch)
        _assert_final_is_labels(frames, batch["labels"], "solver_trajectory")

    if rebuild is not None:
        twin = rebuild()
        assert twin.spec == spec, f"a second build has another spec: {twin.spec} != {spec}"
        for split in ("train", "test"):
            ds, ds2 = task.dataset(split), twin.dataset(split)
            assert len(ds2) == len(ds), f"{split}: a second build has {len(ds2)} examples, the first {len(ds)}"
            idx = pick(len(ds))
            a, b = ds.get(idx), ds2.get(idx)
            assert all(np.array_equal(a[k], b[k]) for k in a), f"{split}: a second build with the same config gives other data"


def _assert_final_is_labels(frames: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    sup = labels != IGNORE
    wrong = (frames[:, -1] != labels) & sup
    assert not wrong.any(), (
        f"{what}: the last frame differs from the labels on {int(wrong.sum())} supervised cells "
        f"(first: batch row {int(wrong.nonzero()[0, 0])}); the last frame must be y*"
    )


# ------------------------------------------------------------------------------ target generators


def check_target_generator(gen: TargetGenerator, task: Task, *, n_sup: int = 4, final_is_labels: bool = True,
                           split: str = "train") -> None:
    """A target generator keeps its contract on `task`'s examples: (B, n_sup, L) int64 frames
    inside the vocabulary (or IGNORE), for `n_sup` and for 1; randomness only from the generator
    it is handed (same seed, same frames; the global RNG untouched); the last frame equals the
    labels on the supervised cells (unless `final_is_labels=False`); and, when it declares
    `monotone`, a distance to y* that never grows."""
    _conforms(gen, "target_generator", TargetGenerator)
    assert isinstance(gen.monotone, bool), f"monotone is a {type(gen.monotone).__name__}; declare True or False"
    ds = task.dataset(split)
    batch = fetch(ds, pick(len(ds)))
    labels = batch["labels"]
    for steps in sorted({n_sup, 1}, reverse=True):
        torch.manual_seed(123)
        global_state = torch.get_rng_state()
        frames = gen(batch, steps, torch.Generator().manual_seed(7))
        assert torch.equal(torch.get_rng_state(), global_state), "the generator drew from torch's global RNG; use the `generator` argument"
        _plugin_error(FramesCheck(task.spec, steps, "the target generator"), frames, batch)
        again = gen(batch, steps, torch.Generator().manual_seed(7))
        assert torch.equal(again, frames), f"n_sup = {steps}: the same generator seed gave other frames"
        if final_is_labels:
            _assert_final_is_labels(frames, labels, f"n_sup = {steps}")
        if gen.monotone:
            d = hamming_to_labels(frames, labels)  # (B, n_sup)
            grows = (d.diff(dim=1) > 0).any(1)
            assert not grows.any(), (
                f"declares monotone, but at n_sup = {steps} the distance to y* grows for batch row "
                f"{int(grows.nonzero()[0, 0])}: {d[grows][0].tolist()}"
            )


# ------------------------------------------------------------------------------ backbones


def check_backbone(backbone: Backbone, spec: TaskSpec, *, n_sup: int = 4, batch_size: int = 3) -> None:
    """A backbone keeps its contract for `spec`: `initial_state` is None, a tensor or a tuple of
    tensors with the B slots first; `forward` returns a state of that structure and those shapes,
    (B, L, V) logits and (B, 2) fp32 q-logits (None without a `HaltingHead`; optionally a dict
    of (B,) losses), also when fed its own state back; a backward reaches the parameters; the
    cost figures are sane. The backward leaves gradients in the backbone: they are set to None
    at the end."""
    _conforms(backbone, "backbone", Backbone)
    assert isinstance(backbone, torch.nn.Module), f"{type(backbone).__name__} is not a torch.nn.Module"
    has_head = isinstance(backbone, HaltingHead)
    assert not has_head or isinstance(backbone.q_head, torch.nn.Module), "q_head is not an nn.Module"
    B, P, L, V = batch_size, backbone.prefix_len, spec.seq_len, spec.vocab_size
    start = backbone.initial_state(B)
    _plugin_error(check_state, start, B, "the backbone")
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0))
    ndim = compat.puzzle_emb_ndim_of(backbone)
    emb = torch.randn(B, ndim, generator=torch.Generator().manual_seed(1)) if ndim else None
    step = torch.tensor([1 + i % n_sup for i in range(B)])

    def forward(state, step):
        try:
            out = backbone(state, tokens, step, emb)
        except Exception as exc:
            raise AssertionError(f"forward raised {type(exc).__name__}: {exc} (called with the state initial_state({B}) "
                                 f"gave or forward returned, tokens {tuple(tokens.shape)} in [0, {V}), step "
                                 f"{step.tolist()}, puzzle_emb {'None' if emb is None else tuple(emb.shape)})") from exc
        return _plugin_error(check_step_output, out, batch=B, seq_len=L, vocab_size=V, who="the backbone", start=start)

    state, logits, q, extra = forward(start, step)
    assert not has_head or q is not None, "the backbone has a q_head but forward returned no q-logits"
    assert torch.isfinite(logits).all() and (q is None or torch.isfinite(q).all()), "forward gave non-finite logits or q-logits"
    try:
        loss = logits.float().logsumexp(-1).mean() + sum(v.sum() for v in extra.values())
        (loss if q is None else loss + q.sum()).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters()), (
            "no gradient reaches the parameters from the logits (is the state detached inside forward?)"
        )
    finally:
        backbone.zero_grad(set_to_none=True)
    with torch.no_grad():  # the next supervision step starts from the state this one returned
        forward(state, torch.clamp(step + 1, max=n_sup))
    calls, grad_calls = backbone.calls_per_step()
    assert isinstance(calls, int) and isinstance(grad_calls, int) and 1 <= grad_calls <= calls, (
        f"calls_per_step() = ({calls}, {grad_calls}); expected integers with 1 <= with-gradient <= all"
    )
    flops = backbone.flops_per_call(P + L)
    assert flops > 0, f"flops_per_call({P + L}) = {flops}"


# ------------------------------------------------------------------------------ halting


def _halting_trace(h: HaltingStrategy, *, training: bool, seed: int, B: int, rounds: int) -> list[list[bool]]:
    """A carry of B slots: each round every slot does one step, halted slots restart."""
    steps = torch.zeros(B, dtype=torch.int64)
    noise = torch.Generator().manual_seed(99)  # q-logits of both signs
    gen = torch.Generator().manual_seed(seed)
    trace = []
    for _ in range(rounds):
        steps = steps + 1
        q = torch.randn(B, 2, generator=noise) * 3
        halted = _plugin_error(check_halt, h.halt(steps, q, training=training, generator=gen), B, "the halting strategy")
        late = ~halted & (steps >= h.max_steps)
        assert not late.any(), f"halt(training={training}) let a slot run past max_steps = {h.max_steps} (steps {steps[late].tolist()})"
        trace.append(halted.tolist())
        steps = torch.where(halted, 0, steps)
    return trace


def check_halting(h: HaltingStrategy, *, n_sup: int | None = None, batch_size: int = 16) -> None:
    """A halting strategy keeps its contract: `halt` returns (B,) bool, True at `max_steps`
    (never later; `max_steps <= n_sup` when given), the same decisions for the same generator
    seed, in training and evaluation; `loss` (and `continue_loss` when used) are (B,) fp32."""
    _conforms(h, "halting", HaltingStrategy)
    uses_continue = compat.member(h, "halting", "uses_continue_loss")
    for attr, value in (("uses_q_head", h.uses_q_head), ("uses_continue_loss", uses_continue)):
        assert isinstance(value, bool), f"{attr} is a {type(value).__name__}; declare True or False"
    assert isinstance(h.max_steps, int) and h.max_steps >= 1, f"max_steps = {h.max_steps!r}"
    if n_sup is not None:
        assert h.max_steps <= n_sup, f"max_steps = {h.max_steps} > n_sup = {n_sup}: targets exist only for n_sup steps"
    for training in (True, False):
        trace = _halting_trace(h, training=training, seed=3, B=batch_size, rounds=4 * h.max_steps + 4)
        again = _halting_trace(h, training=training, seed=3, B=batch_size, rounds=4 * h.max_steps + 4)
        assert trace == again, f"halt(training={training}): the same generator seed gave other decisions"
    B = batch_size
    q = torch.randn(B, 2, generator=torch.Generator().manual_seed(5))
    _plugin_error(check_per_slot_loss, h.loss(q, torch.arange(B) % 2 == 0), B, "the halting strategy", "loss")
    if uses_continue:
        nxt = torch.randn(B, 2, generator=torch.Generator().manual_seed(6))
        _plugin_error(check_per_slot_loss, h.continue_loss(q, nxt, torch.arange(B) % 3 == 0), B, "the halting strategy", "continue_loss")


# ------------------------------------------------------------------------------ evaluators


def eval_record(batch: dict, preds: torch.Tensor, steps: torch.Tensor | None = None, q_halt: torch.Tensor | None = None) -> EvalRecord:
    B, N = preds.shape[:2]
    return EvalRecord(
        batch=batch, preds=preds,
        q_halt=torch.zeros(B) if q_halt is None else q_halt,
        steps=torch.full((B,), N, dtype=torch.int64) if steps is None else steps,
    )


def run_ranks(ev: Evaluator, records: Iterable[EvalRecord], out_dir: Path | None) -> dict[str, float]:
    """One fake rank per record: reset, update, the state through pickle (as the gather sends
    it); then rank 0's compute over all the states."""
    states = []
    for rec in records:
        ev.reset()
        ev.update(rec)
        try:
            blob = pickle.dumps(ev.state())
        except Exception as exc:
            raise AssertionError(f"state() is not picklable ({type(exc).__name__}: {exc}); it is gathered across ranks") from None
        states.append(pickle.loads(blob))
    return _plugin_error(check_metrics, ev.compute(states, out_dir), "compute")


def check_evaluator(ev: Evaluator, task: Task, *, perfect: Iterable[str] = (), n_steps: int = 3, limit: int = 32,
                    out_dir: Path | None = None) -> dict[str, float]:
    """An evaluator keeps its contract on `task`'s test examples: a `headline` naming one of
    its metrics (without one, written against contract 1.0: a `DisContractWarning`); state
    picklable; metrics a dict of numbers; the metrics of two fake ranks merged equal those of
    one pass; imperfect predictions score otherwise than perfect ones; and each metric named in
    `perfect` is 1.0 for perfect predictions. Returns the metrics of perfect predictions."""
    _conforms(ev, "evaluator", Evaluator)
    declared = compat.member(ev, "evaluator", "headline")
    assert declared is None or (isinstance(declared, str) and declared), (
        f"headline is {declared!r}; name the metric that says how well the task is solved")
    out_dir = Path(tempfile.mkdtemp(prefix="dis-testing-")) if out_dir is None else Path(out_dir)
    ds = task.dataset("test")
    batch = fetch(ds, np.arange(min(len(ds), limit)))
    labels = batch["labels"]
    B, L = labels.shape
    V, N = task.spec.vocab_size, n_steps
    oracle = torch.where(labels == IGNORE, task.spec.pad_id, labels)  # y*, unsupervised cells predicted as PAD
    try:
        best = run_ranks(ev, [eval_record(batch, oracle[:, None].expand(B, N, L).clone())], out_dir / "perfect")
    except KeyError as exc:
        raise AssertionError(f"the evaluator needs batch key {exc}, which the task's batches lack") from None
    for key in perfect:
        assert key in best, f"perfect predictions give no metric {key!r}; the metrics are {sorted(best)}"
        assert best[key] == 1.0, f"perfect predictions score {key} = {best[key]}, not 1.0"
    assert declared is None or declared in best, f"headline {declared!r} is not among the metrics {sorted(best)}"

    # Imperfect predictions, varied steps and confidences: merging two halves equals one pass.
    preds = oracle[:, None].expand(B, N, L).clone()
    rows = torch.arange(B)
    cell = (labels != IGNORE).long().argmax(-1)  # (B,) a supervised cell of each example
    for s in range(N):
        wrong = (rows < (B + 1) // 2) | (s == 0)  # the first half stays wrong; the rest mends after step 1
        preds[rows[wrong], s, cell[wrong]] = (oracle[rows[wrong], cell[wrong]] + 1) % V
    steps = torch.where(rows % 3 == 0, N - 1, N)
    q = torch.linspace(-2.0, 2.0, B)
    one = run_ranks(ev, [eval_record(batch, preds, steps, q)], out_dir / "one")
    h = B // 2
    halves = [eval_record({k: v[:h] for k, v in batch.items()}, preds[:h], steps[:h], q[:h]),
              eval_record({k: v[h:] for k, v in batch.items()}, preds[h:], steps[h:], q[h:])]
    merged = run_ranks(ev, halves, out_dir / "merged")
    assert merged.keys() == one.keys(), f"two ranks give the metrics {sorted(merged)}, one pass {sorted(one)}"
    for key in one:
        a, b = merged[key], one[key]
        assert a == b or abs(a - b) <= 1e-6 * max(1.0, abs(b)) or (a != a and b != b), (
            f"{key}: the states of two ranks merged give {a}, one pass over the same examples {b}"
        )
    assert one != best, "imperfect predictions score exactly like perfect ones"
    return best


# ------------------------------------------------------------------------------ optimizers


def check_optimizer(make: Callable[[list], torch.optim.Optimizer], *, steps: int = 30) -> None:
    """An optimizer factory's `make(params)` keeps its contract: a torch Optimizer built with
    its base lr in every group (the trainer scales it), that lowers a small regression loss
    once the trainer writes a rate, and whose state dict loads into a fresh one (checkpoints)."""
    assert callable(make), f"the factory returned a {type(make).__name__}; expected make(params) -> torch.optim.Optimizer"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = make(list(net.parameters()))
    assert isinstance(opt, torch.optim.Optimizer), f"make(params) returned a {type(opt).__name__}, not a torch.optim.Optimizer"
    assert all(g["lr"] > 0 for g in opt.param_groups), "build the optimizer with its base lr (> 0) in every group: the trainer scales it"
    for g in opt.param_groups:
        g["lr"] = 1e-2  # as the trainer's schedule writes it
    x = torch.randn(64, 4)
    target = torch.stack([x[:, 0] - x[:, 1], x[:, 2] * 0.5], 1)

    def loss():
        return ((net(x) - target) ** 2).mean()

    start = float(loss().detach())
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters()), "the optimizer made a parameter non-finite"
    end = float(loss().detach())
    assert end < start, f"{steps} steps at lr 1e-2 did not lower a small regression loss ({start:.4f} -> {end:.4f})"
    make(list(net.parameters())).load_state_dict(opt.state_dict())


# ------------------------------------------------------------------------------ loggers


def check_logger(logger, run_dir: str | Path | None = None) -> None:
    """A logger keeps its contract: its four methods, called as the run directory calls them
    (`start` with the recipe and run.json, metrics.jsonl rows, trajectory PNGs, `finish` with
    summary.json), raise nothing. Point the logger at local storage first (W&B offline, a
    file-store MLflow URI): this calls it for real."""
    for method in ("start", "log", "images", "finish"):
        assert callable(getattr(logger, method, None)), f"a logger needs a method {method}(...) (docs/hooks.md, register_loggers)"
    import json

    import matplotlib.image

    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="dis-logger-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = {"task": {"name": "toy", "config": {}}, "train": {"seed": 0, "global_batch_size": 4, "steps": 2}}
    info = {"name": run_dir.name, "world_size": 1, "params": 10, "headline_metrics": ["toy/exact_accuracy"]}
    (run_dir / "recipe.toml").write_text('[task]\nname = "toy"\n[train]\nseed = 0\nglobal_batch_size = 4\nsteps = 2\n')
    (run_dir / "run.json").write_text(json.dumps(info))
    png = run_dir / "eval" / "step_2" / "trajectories" / "example_000000.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(png, np.linspace(0, 1, 8 * 8 * 3).reshape(8, 8, 3))
    logger.start(run_dir, recipe, info)
    logger.log({"step": 1, "split": "train", "train/loss": 1.25, "train/lr": 1e-3, "cost/examples": 4})
    logger.log({"step": 2, "split": "train", "train/loss": 0.75, "train/lr": 1e-3, "cost/examples": 8})
    logger.log({"step": 2, "split": "eval", "toy/exact_accuracy": 0.5, "toy/hamming@1": 2.0, "cost/examples": 8})
    logger.images(2, [png])
    logger.finish({"step": 2, "toy/exact_accuracy": 0.5, "cost/examples": 8, "params": 10})
