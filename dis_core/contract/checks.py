"""Checks at the boundary: what a plugin hands the core is checked where it enters, and a wrong
output becomes a `PluginError` naming the component and its plugin, instead of a raw torch error
later on (or training on silently wrong data).

Where each runs (cheap checks only: shapes, dtypes, and one min/max-style pass over the values):
  task batches       `BatchCheck`, in `dis_core.step.data.fetch` (every batch, training and test)
  target frames      `FramesCheck`, when slots are refilled and in the targets report
  backbone outputs,  `check_state`, `check_step_output`, `check_halt`, `check_metrics`: in `dis check`
  halting, metrics   and `dis_core.testing`, which add what costs more (determinism, merging states)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
import torch

from dis_core.contract.errors import PluginError
from dis_core.contract.interfaces import IGNORE, TaskSpec

REQUIRED_KEYS = ("inputs", "labels", "puzzle_ids", "example_ids")
# Integer dtypes `dis_core.step.data.to_torch` widens to int64; anything else would reach the model as is.
INT_DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.int64)


@attrs.frozen
class Who:
    """A component, as error messages name it: `target generator 'x' (plugin 'y')`."""

    kind: str  # registry kind: task, backbone, target_generator, halting, evaluator, optimizer
    name: str
    plugin: str | None = None

    def __str__(self) -> str:
        text = f"{self.kind.replace('_', ' ')} {self.name!r}"
        return text + (f" (plugin {self.plugin!r})" if self.plugin else "")

    @classmethod
    def of(cls, registry, kind: str, name: str) -> "Who":
        """The component `(kind, name)` with the plugin that provides it, when `registry` knows it."""
        plugin = registry.get(kind, name).plugin if registry is not None and (kind, name) in registry else None
        return cls(kind, name, plugin)


def _fail(who, text: str) -> PluginError:
    return PluginError(f"{who} returned {text}")


def _shape(a) -> tuple:
    return tuple(a.shape)


def _first_bad(values: np.ndarray | torch.Tensor, bad) -> tuple[int, tuple[int, ...]]:
    """(value, position) of the first True cell of `bad`."""
    pos = tuple(int(i) for i in (np.argwhere(bad)[0] if isinstance(bad, np.ndarray) else bad.nonzero()[0]))
    return int(values[pos]), pos


def outside_vocab(values, vocab_size: int, *, ignore_ok: bool):
    """Mask of the cells outside [0, V) (IGNORE allowed where `ignore_ok`); None when there is none."""
    if isinstance(values, np.ndarray):
        if values.size == 0:
            return None
        lo, hi = values.min(), values.max()
    else:
        if values.numel() == 0:
            return None
        lo, hi = torch.aminmax(values)
    if lo >= 0 and hi < vocab_size:  # one pass, the common case
        return None
    bad = (values < 0) | (values >= vocab_size)
    if ignore_ok:
        bad = bad & (values != IGNORE)
    return bad if bool(bad.any()) else None


@attrs.frozen
class BatchCheck:
    """What `Dataset.get(indices)` must return (docs/hooks.md, "register_tasks(register)"):
    the four keys, every array with first dimension K, integer ids, `example_ids == indices`; with
    the task's `spec`, also sequences of `seq_len`, tokens inside the vocabulary and puzzle ids
    inside the table. Called on the numpy arrays, before they become tensors: no device sync."""

    spec: TaskSpec | None = None
    who: Who | str | None = None  # named in the message

    def __call__(self, arrays: Any, indices: np.ndarray) -> None:
        who = self.who or "the dataset's get()"
        idx = np.asarray(indices)
        K = len(idx)
        if not isinstance(arrays, Mapping):
            raise _fail(who, f"a {type(arrays).__name__}; expected a dict of numpy arrays with the keys {', '.join(REQUIRED_KEYS)}")
        missing = [k for k in REQUIRED_KEYS if k not in arrays]
        if missing:
            raise _fail(who, f"a batch without {', '.join(missing)}; every batch has {', '.join(REQUIRED_KEYS)}")
        for key, a in arrays.items():
            if not isinstance(a, np.ndarray):
                raise _fail(who, f"{key} as a {type(a).__name__}; expected a numpy array")
            if a.ndim == 0 or a.shape[0] != K:
                raise _fail(who, f"{key} of shape {_shape(a)} for {K} indices; every array's first dimension is the number of indices asked for")
        for key in REQUIRED_KEYS:
            if arrays[key].dtype.type not in INT_DTYPES:
                raise _fail(who, f"{key} of dtype {arrays[key].dtype}; expected integers (int64, or int32/int16/int8/uint8, which are widened)")
        x, y = arrays["inputs"], arrays["labels"]
        L = self.spec.seq_len if self.spec is not None else (x.shape[1] if x.ndim == 2 else "L")
        for key in ("inputs", "labels"):
            if _shape(arrays[key]) != (K, L):
                where = "spec.seq_len" if self.spec is not None else "the length of inputs"
                raise _fail(who, f"{key} of shape {_shape(arrays[key])}; expected ({K}, {L}) = (indices asked for, {where})")
        for key in ("puzzle_ids", "example_ids"):
            if arrays[key].ndim != 1:
                raise _fail(who, f"{key} of shape {_shape(arrays[key])}; expected ({K},)")
        eids = arrays["example_ids"]
        if not np.array_equal(eids, idx):
            i = int(np.argmax(eids != idx))
            raise _fail(who, f"example_ids that do not equal the indices asked for (index {int(idx[i])} gave example_id "
                             f"{int(eids[i])}); set example_ids to the indices passed to get()")
        if self.spec is None:
            return
        V = self.spec.vocab_size
        bad = outside_vocab(x, V, ignore_ok=False)
        if bad is not None:
            value, (row, cell) = _first_bad(x, bad)
            raise _fail(who, f"input token {value} (example {int(idx[row])}, cell {cell}) outside the vocabulary [0, {V}); "
                             f"spec.vocab_size = {V} must count every token id")
        bad = outside_vocab(y, V, ignore_ok=True)
        if bad is not None:
            value, (row, cell) = _first_bad(y, bad)
            raise _fail(who, f"label {value} (example {int(idx[row])}, cell {cell}) outside the vocabulary [0, {V}) and not "
                             f"IGNORE ({IGNORE}); spec.vocab_size = {V} must count every token id")
        pids, rows = arrays["puzzle_ids"], self.spec.num_puzzle_ids
        if K and (pids.min() < 0 or pids.max() >= rows):
            i = int(np.argmax((pids < 0) | (pids >= rows)))
            raise _fail(who, f"puzzle_id {int(pids[i])} (example {int(idx[i])}) outside [0, {rows}); spec.num_puzzle_ids = {rows} "
                             f"counts the rows of the puzzle-embedding table")


@attrs.frozen
class FramesCheck:
    """What a target generator must return for a batch: (B, n_sup, L) int64 token ids, IGNORE
    where a cell is not supervised. Returns the frames, so a call site can wrap the call."""

    spec: TaskSpec
    n_sup: int
    who: Who | str | None = None  # named in the message

    def __call__(self, frames: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        who = self.who or "the target generator"
        B, L, V = len(batch["labels"]), self.spec.seq_len, self.spec.vocab_size
        expected = (B, self.n_sup, L)
        if not torch.is_tensor(frames):
            raise _fail(who, f"a {type(frames).__name__}; expected a torch.Tensor of shape {expected} = "
                             f"(batch, supervision.n_sup, task seq_len)")
        if _shape(frames) != expected:
            raise _fail(who, f"frames of shape {_shape(frames)}; expected {expected} = (batch, supervision.n_sup, task seq_len)")
        if frames.dtype != torch.int64:
            hint = " (token ids: round, then .long())" if frames.is_floating_point() else " (.long())"
            raise _fail(who, f"frames of dtype {frames.dtype}; expected torch.int64 token ids{hint}")
        bad = outside_vocab(frames, V, ignore_ok=True)
        if bad is not None:
            value, (row, step, cell) = _first_bad(frames, bad)
            raise _fail(who, f"token {value} at step {step + 1} (batch row {row}, cell {cell}) outside the task's vocabulary "
                             f"[0, {V}) and not IGNORE ({IGNORE})")
        return frames


@attrs.frozen
class Boundary:
    """The checks of one built recipe, each naming its component and plugin."""

    batch: BatchCheck
    frames: FramesCheck

    @classmethod
    def of(cls, comp, registry=None) -> "Boundary":
        """For `dis_core.wiring.build.Components`; the plugins are named when `registry` is given."""
        recipe = comp.resolved.recipe
        spec = comp.task.spec
        return cls(
            batch=BatchCheck(spec, Who.of(registry, "task", recipe.task.name)),
            frames=FramesCheck(spec, recipe.supervision.n_sup, Who.of(registry, "target_generator", recipe.targets.name)),
        )


_UNSET = object()


def _state_tensors(state: Any) -> tuple | None:
    """The tensors of a backbone state (None, a tensor, a tuple of tensors); None if it is none of those."""
    if state is None:
        return ()
    if torch.is_tensor(state):
        return (state,)
    if isinstance(state, (tuple, list)) and all(torch.is_tensor(t) for t in state):
        return tuple(state)
    return None


def _structure(state: Any) -> str:
    """How a state reads in a message, and what two states of one structure and shapes share."""
    if state is None:
        return "None"
    if torch.is_tensor(state):
        return f"a tensor of shape {_shape(state)}"
    return f"a tuple of {len(state)} tensors of shapes {', '.join(str(_shape(t)) for t in state)}"


def check_state(state: Any, batch: int, who, method: str = "initial_state") -> tuple:
    """A backbone's state (from `initial_state` or `forward`): None, a tensor or a tuple of
    tensors, each with the B slots first (the carry refills slots row by row). Returns its tensors."""
    tensors = _state_tensors(state)
    if tensors is None:
        raise _fail(who, f"a state of type {type(state).__name__} from {method}; expected None, a tensor or a tuple of tensors")
    for t in tensors:
        if t.dim() == 0 or t.shape[0] != batch:
            raise _fail(who, f"a state tensor of shape {_shape(t)} from {method}; every tensor of the state has the {batch} slots first")
    return tensors


def check_step_output(out: Any, *, batch: int, seq_len: int, vocab_size: int, who, start: Any = _UNSET,
                      prefix_len: int | None = None, hidden_size: int | None = None) -> tuple:
    """A backbone's `forward` result (docs/hooks.md, "register_backbones(register)"): returns
    (state, logits, q, extra_losses) when it is (state, (B, L, V) logits, (B, 2) fp32 q-logits or
    None[, {name: (B,)}]). The state is None, a tensor or a tuple of tensors, each with the B slots
    first; given `start` (the state the call began from, `initial_state`'s), the new state must have
    its structure and shapes. Without `start`, `prefix_len` and `hidden_size` check a pair (y, z)
    against (B, prefix_len + seq_len, hidden_size), as callers written before the state was generic do."""
    B, L, V = batch, seq_len, vocab_size
    if not isinstance(out, (tuple, list)) or len(out) not in (3, 4):
        n = f" of {len(out)} items" if isinstance(out, (tuple, list)) else ""
        raise _fail(who, f"a {type(out).__name__}{n} from forward; expected (state, logits, q_logits) or "
                         f"(state, logits, q_logits, extra_losses)")
    state, logits, q = out[:3]
    extra = out[3] if len(out) == 4 else {}
    tensors = check_state(state, B, who, "forward")
    if start is not _UNSET:
        if _structure(state) != _structure(start):
            raise _fail(who, f"a state that is {_structure(state)} from forward, starting from {_structure(start)}; "
                             f"forward returns a state of the structure and shapes initial_state gives")
    elif prefix_len is not None and hidden_size is not None and isinstance(state, (tuple, list)) and len(tensors) == 2:
        S, D = prefix_len + seq_len, hidden_size
        for part, t in zip("yz", tensors):
            if _shape(t) != (B, S, D):
                raise _fail(who, f"{part} of shape {_shape(t)} from forward; expected ({B}, {S}, {D}) = (batch, prefix_len + seq_len, hidden_size)")
    if not torch.is_tensor(logits) or _shape(logits) != (B, L, V) or not logits.is_floating_point():
        got = f"of shape {_shape(logits)} and dtype {logits.dtype}" if torch.is_tensor(logits) else f"as a {type(logits).__name__}"
        raise _fail(who, f"logits {got} from forward; expected floating ({B}, {L}, {V}) = (batch, task seq_len, vocab_size), "
                         f"over the task positions only")
    if q is not None and (not torch.is_tensor(q) or _shape(q) != (B, 2) or q.dtype != torch.float32):
        got = f"of shape {_shape(q)} and dtype {q.dtype}" if torch.is_tensor(q) else f"as a {type(q).__name__}"
        raise _fail(who, f"q_logits {got} from forward; expected float32 ({B}, 2) = [halt, continue], or None without a q-head")
    if not isinstance(extra, Mapping):
        raise _fail(who, f"extra losses as a {type(extra).__name__}; expected a dict {{name: ({B},) tensor}}")
    for name, t in extra.items():
        if not torch.is_tensor(t) or _shape(t) != (B,) or not t.is_floating_point():
            got = f"of shape {_shape(t)}" if torch.is_tensor(t) else f"as a {type(t).__name__}"
            raise _fail(who, f"the extra loss {name!r} {got}; expected a floating ({B},) per-slot loss")
    return state, logits, q, dict(extra)


def check_halt(halted: Any, batch: int, who) -> torch.Tensor:
    """A halting strategy's `halt` result: (B,) bool."""
    if not torch.is_tensor(halted) or _shape(halted) != (batch,) or halted.dtype != torch.bool:
        got = f"of shape {_shape(halted)} and dtype {halted.dtype}" if torch.is_tensor(halted) else f"a {type(halted).__name__}"
        raise _fail(who, f"{got} from halt; expected a ({batch},) bool tensor, True where the slot halts now")
    return halted


def check_per_slot_loss(loss: Any, batch: int, who, method: str) -> torch.Tensor:
    """A halting strategy's `loss` / `continue_loss` result: (B,) float32, finite."""
    if not torch.is_tensor(loss) or _shape(loss) != (batch,) or loss.dtype != torch.float32:
        got = f"of shape {_shape(loss)} and dtype {loss.dtype}" if torch.is_tensor(loss) else f"a {type(loss).__name__}"
        raise _fail(who, f"{got} from {method}; expected a float32 ({batch},) per-slot loss")
    if not bool(torch.isfinite(loss).all()):
        raise _fail(who, f"a non-finite loss from {method}: {loss.tolist()}")
    return loss


def check_metrics(metrics: Any, who) -> dict[str, float]:
    """An evaluator's `compute` result: a dict of metric name -> number (no evaluator prefix)."""
    if not isinstance(metrics, Mapping):
        raise _fail(who, f"a {type(metrics).__name__} from compute; expected a dict of metric name -> number")
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise _fail(who, f"the metric name {key!r} from compute; expected a non-empty string")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise _fail(who, f"metric {key!r} = {value!r} from compute; expected a number") from None
    return out
