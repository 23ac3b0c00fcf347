"""Measuring what a run needs, for the preflight (dis_core.loop.preflight): a probe step.

A probe runs one supervision step (forward and backward) of 1 and 2 slots on the recipe's real
shapes, and one evaluation step of 1 and 2 examples, each after a warm-up, recording the peak
memory: on a CPU the larger of the live tensors (a dispatch mode that sees every tensor torch's
ops allocate) and the growth of the process's peak resident size (what the kernel's OOM killer
sees: the tensors plus what kernels allocate for themselves and freed memory the allocator keeps,
~1.6x the tensors on ARC shapes); on a GPU the allocator's peak. Memory is linear in the slots
(`Linear`). A timed step of 8 slots, or more while that stays quick, gives the time; an AdamW
step over copies of the parameters the optimizer's state. The probe leaves the model, its
gradients, the puzzle table and every random generator as they were, so a run trains the same
with or without it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import time
import weakref
from pathlib import Path

import attrs
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from dis_core.contract.errors import UserError
from dis_core.contract.interfaces import EvalRecord
from dis_core.loop.evaluation import options
from dis_core.step.data import fetch
from dis_core.step.guidance import has_readouts
from dis_core.step.supervision import Carry, state_tensors

TIMED_SLOTS = 8  # the timed probe step starts with this many slots (fewer if the micro-batch is smaller) ...
QUICK_S = 0.25  # ... and grows while it takes less than this
SLOW_S = 1.0  # a memory probe this slow gives the time itself
PROBE_SLOTS = (1, 2)  # the memory probes' sizes


# ------------------------------------------------------------------ memory


class _LiveTensors(TorchDispatchMode):
    """The bytes of tensor storage alive, and their peak, while the mode is on: every op's
    outputs are counted once per storage until the storage is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        self.live[key] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._count, out)
        return out


@contextlib.contextmanager
def _peak_bytes(device: torch.device, *, track: bool = True):
    """Yields a dict whose "peak" is, after the block, the most bytes the block's tensors held
    at once, above what was allocated before it. Without `track`, nothing is measured (the
    dispatch mode's Python call per op would distort a timed step on a CPU)."""
    found = {"peak": 0.0}
    if not track:
        yield found
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield found
        torch.cuda.synchronize(device)
        found["peak"] = float(torch.cuda.max_memory_allocated(device) - start)
        return
    rss = _ResidentPeak.start()
    mode = _LiveTensors()
    with mode:
        yield found
    # The process's own peak is what the kernel's OOM killer sees: the live tensors plus what
    # kernels allocate for themselves and freed memory the allocator keeps (on ARC shapes ~1.6x
    # the tensors, linear in the slots). The tensors alone where it cannot be read.
    found["peak"] = float(max(mode.peak, rss.growth() if rss else 0))


class _ResidentPeak:
    """The growth of this process's peak resident size (VmHWM) over a block, on Linux: the
    allocator's free memory is first returned to the system (glibc's malloc_trim) and the peak
    reset (/proc/self/clear_refs), so that the block's own peak shows."""

    def __init__(self, base: int):
        self.base = base

    @classmethod
    def start(cls) -> "_ResidentPeak | None":
        try:
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5 resets the peak resident size, nothing else
            return cls(_status("VmRSS"))
        except (OSError, AttributeError, ValueError):  # not Linux, or not glibc
            return None

    def growth(self) -> int:
        try:
            return max(0, _status("VmHWM") - self.base)
        except (OSError, ValueError):
            return 0


def _status(field: str) -> int:
    """A size in /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if m is None:
        raise ValueError(field)
    return int(m.group(1)) * 1024


def tensor_bytes(*objs) -> int:
    total = 0
    for obj in objs:
        if torch.is_tensor(obj):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            total += tensor_bytes(*obj.values())
        elif isinstance(obj, (list, tuple)):
            total += tensor_bytes(*obj)
    return total


def resident_bytes() -> int:
    """This process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far (KiB on Linux, bytes on macOS)
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if os.uname().sysname == "Darwin" else rss * 1024


def parse_bytes(text: str) -> int:
    """"22GiB", "500 MB", "1.5G", "123456" -> bytes (K/M/G/T are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"DIS_MEMORY_LIMIT={text!r}: expected a size such as 8GiB, 500MB or a number of bytes")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def available_memory(device: torch.device, *, local_processes: int = 1) -> tuple[int | None, str]:
    """(bytes this process may hold in all, where the figure comes from). On a GPU, its free
    memory plus what this process's allocator holds. On a CPU, what the process holds plus its
    share of MemAvailable, or of the cgroup's limit less its usage when that is smaller.
    DIS_MEMORY_LIMIT (e.g. "16GiB") caps it: to leave room for other jobs."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        found, source = free + torch.cuda.memory_reserved(device), f"free on {torch.cuda.get_device_name(device)} ({total / 2**30:.0f} GiB)"
    else:
        held, room, source = resident_bytes(), None, None
        try:
            meminfo = Path("/proc/meminfo").read_text()
            room, source = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024, "MemAvailable"
        except (OSError, AttributeError):
            pass
        for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
            cap, used = _read_int(limit), _read_int(usage)
            if cap is not None and used is not None and cap < 2**60 and (room is None or cap - used < room):
                room, source = max(0, cap - used), "the cgroup's memory limit"
        found = None if room is None else held + room // max(1, local_processes)
        if local_processes > 1 and source:
            source += f", shared by {local_processes} processes"
    if os.environ.get("DIS_MEMORY_LIMIT"):
        cap = parse_bytes(os.environ["DIS_MEMORY_LIMIT"])
        if found is None or cap < found:
            found, source = cap, "DIS_MEMORY_LIMIT"
    return found, source or "unknown"


# ------------------------------------------------------------------ the probe


@attrs.frozen(kw_only=True)
class Linear:
    """bytes(k) = fixed + per_slot * k, from two measured sizes."""

    fixed: float
    per_slot: float

    @classmethod
    def fit(cls, sizes: tuple[int, int], values: tuple[float, float]) -> "Linear":
        (k1, k2), (b1, b2) = sizes, values
        per = max((b2 - b1) / (k2 - k1), b2 / k2 / 2, 1.0)  # never flat: activations grow with the slots
        return cls(fixed=max(0.0, b2 - per * k2), per_slot=per)

    def at(self, k: int) -> float:
        return self.fixed + self.per_slot * k


@attrs.frozen(kw_only=True)
class Probe:
    """What the probe measured on this machine (bytes, seconds)."""

    train: Linear  # peak bytes of one training step (forward and backward) of k slots
    evaluation: Linear  # peak bytes of an evaluation rollout of k examples
    outputs_per_slot: float  # a step's new state and logits, per slot (kept for the whole share)
    carry_per_slot: float  # the carry: state, examples, target paths, per slot
    evaluator_per_example: float  # the evaluators' state grows by this per test example
    optimizer: float  # the optimizer's state and the gradients
    train_s_per_slot: float  # forward and backward, per slot, at `timed_slots`
    timed_slots: int
    optimizer_s: float  # one optimizer step
    refill_s_per_example: float  # loading an example and its target path
    eval_s_per_example: float  # one rollout of one test example
    seconds: float  # the probe's own time


def _probe_batch(solver, dataset, k: int):
    idx = np.arange(k) % len(dataset)
    return fetch(dataset, idx, solver.device, solver.boundary.batch)


def _train_step(solver, module, k: int, *, track: bool = True) -> tuple[float, float, float, float, float]:
    """(peak bytes, seconds, outputs bytes, carry bytes, seconds loading the examples) of one
    training step of k fresh slots."""
    begin = time.perf_counter()
    batch = _probe_batch(solver, solver.dataset("train"), k)
    # y* as every step's target: the step's cost does not depend on the targets' content, and the
    # target generator is left uncalled (its calls, and its random draws, stay the run's own).
    frames = batch["labels"].unsqueeze(1).expand(-1, solver.rule.n_sup, -1)  # (k, N, L)
    carry = Carry.empty(solver.backbone, k, solver.spec.seq_len, solver.rule.n_sup, solver.device)
    carry.refill(torch.arange(k, device=solver.device), batch, frames.to(solver.device), solver.backbone.initial_state(k))
    _sync(solver.device)
    loading = time.perf_counter() - begin
    with _peak_bytes(solver.device, track=track) as found:
        start = time.perf_counter()
        out = module(carry.step_in(solver.rule, solver.puzzle_rows(carry.batch["puzzle_ids"])))
        out.loss.backward()
        _sync(solver.device)
        seconds = time.perf_counter() - start
    outputs = tensor_bytes(state_tensors(out.state), out.logits)
    held = tensor_bytes(state_tensors(carry.state), carry.steps, carry.halted, carry.targets, carry.tokens, carry.batch)
    return found["peak"], seconds, outputs, held, loading


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eval_split(recipe) -> str:
    """The split a run evaluates on (`eval.split` where the recipe has it)."""
    return getattr(recipe.eval, "split", "test")


def _eval_step(solver, recipe, k: int, *, track: bool = True) -> tuple[float, float, float]:
    """(peak bytes, seconds, evaluator state bytes) of an evaluation rollout of k test examples,
    as `evaluation.evaluate` runs it. One supervision step is run, and its time counted for all
    of them: every step has the same shapes, so the peak is the same (TRM's 16 steps of 15
    calls would take minutes on a CPU)."""
    opts = options(recipe.eval)
    margin = opts["margin"] and has_readouts(solver.backbone, opts["readout"])  # as evaluate() drops it
    batch = _probe_batch(solver, solver.dataset(eval_split(recipe)), k)
    with _peak_bytes(solver.device, track=track) as found:
        start = time.perf_counter()
        out = solver.rollout(batch, max_steps=1, generator=torch.Generator().manual_seed(0), readout=opts["readout"],
                             margin=margin)
        _sync(solver.device)
        seconds = (time.perf_counter() - start) * solver.halting.max_steps
    record = EvalRecord(batch={key: v.cpu() for key, v in batch.items()}, preds=out.preds.cpu(), q_halt=out.q_halt.cpu(),
                        steps=out.steps.cpu())
    state = 0
    for ev in solver.evaluators.values():  # reset before and after: evaluate() resets them anyway
        ev.reset()
        ev.update(record)
        with contextlib.suppress(Exception):  # a state pickle cannot measure is counted as nothing
            state += len(pickle.dumps(ev.state()))
        ev.reset()
    return found["peak"], seconds, state


def _optimizer(solver, module) -> tuple[float, float]:
    """(bytes of the optimizer's state and gradients, seconds of one step), from torch's AdamW
    stepping once over copies of the trainable parameters. It stands in for the recipe's
    optimizer, whose factory the run calls once (a plugin may count on it): every builtin
    optimizer keeps AdamW's two moments per parameter."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params)
    start = time.perf_counter()
    opt.step()
    _sync(solver.device)
    seconds = time.perf_counter() - start
    return float(tensor_bytes(list(opt.state.values())) + tensor_bytes([p.grad for p in params])), seconds


def _timed(run, first: int, most: int, tracked: tuple[int, float]) -> tuple[float, int]:
    """(seconds per slot, slots) of `run(k)` (seconds of k slots), from `first` slots and
    growing to at most `most` while a run stays short: small batches use a CPU's cores poorly,
    so the largest cheap size gives the best estimate. A memory probe's (slots, seconds) that
    took `SLOW_S` or more is taken as it is: the dispatch mode's cost per op is then lost in the
    noise, and a step on those shapes (ARC's) is too slow to repeat."""
    if tracked[1] >= SLOW_S:
        return tracked[1] / tracked[0], tracked[0]
    k = max(1, min(first, most))
    seconds = run(k)
    while seconds < QUICK_S and k < most:
        k = min(most, 4 * k)
        seconds = run(k)
    return seconds / k, k


def probe(solver, *, train_slots: int, eval_slots: int) -> Probe:
    """Measure a training step, an evaluation rollout and an optimizer step of `solver` on its
    real shapes: memory at 1 and 2 slots, time at up to `train_slots` (`eval_slots`) slots,
    after the memory probes have warmed the kernels up. The model, its gradients, the puzzle
    table and every random generator are left as they were."""
    start = time.perf_counter()
    module = solver.step_module()
    was = module.training
    module.train()
    devices = [solver.device] if solver.device.type == "cuda" else []
    refill = []

    def train_step(k: int) -> float:
        _, seconds, _, _, loading = _train_step(solver, module, k, track=False)
        refill.append(loading / k)
        _clear(solver, module)
        return seconds

    try:
        with torch.random.fork_rng(devices=devices):
            # Warm-up, measured and dropped: what the first call allocates once (kernel caches,
            # the dispatch mode's own imports) is no activation.
            _train_step(solver, module, 1)
            _clear(solver, module)
            train = [_train_step(solver, module, k) for k in PROBE_SLOTS]
            refill.append(train[-1][4] / PROBE_SLOTS[-1])
            _clear(solver, module)
            train_s, timed = _timed(train_step, TIMED_SLOTS, train_slots, (PROBE_SLOTS[-1], train[-1][1]))
            optimizer, optimizer_s = _optimizer(solver, module)
            evals, eval_s = [(0.0, 0.0, 0)] * 2, 0.0
            if len(solver.dataset(eval_split(solver.recipe))):
                with solver.evaluating(), torch.inference_mode():
                    _eval_step(solver, solver.recipe, 1)  # warm-up, as above
                    evals = [_eval_step(solver, solver.recipe, k) for k in PROBE_SLOTS]
                    eval_s, _ = _timed(lambda k: _eval_step(solver, solver.recipe, k, track=False)[1], TIMED_SLOTS, eval_slots,
                                       (PROBE_SLOTS[-1], evals[-1][1]))
    finally:
        _clear(solver, module)
        module.train(was)
    k = PROBE_SLOTS[-1]
    return Probe(
        train=Linear.fit(PROBE_SLOTS, (train[0][0], train[1][0])),
        evaluation=Linear.fit(PROBE_SLOTS, (evals[0][0], evals[1][0])),
        outputs_per_slot=train[1][2] / k, carry_per_slot=train[1][3] / k, evaluator_per_example=evals[1][2] / k,
        optimizer=optimizer, train_s_per_slot=train_s, timed_slots=timed, optimizer_s=optimizer_s,
        refill_s_per_example=max(0.0, refill[-1]), eval_s_per_example=eval_s, seconds=time.perf_counter() - start,
    )


def _clear(solver, module) -> None:
    """Undo a probe step's side effects: parameter gradients and the puzzle rows awaiting a step."""
    for p in module.parameters():
        p.grad = None
    if solver.puzzle_emb is not None:
        solver.puzzle_emb.discard_pending()
