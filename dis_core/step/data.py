"""Feeding examples: resumable per-rank index streams, and numpy -> torch batches.

A stream is an endless sequence of example indices, cut into global batches: global batch g
covers stream positions [g*G, (g+1)*G) and rank r owns the r-th contiguous slice of it. So two
processes with half the batch each see exactly the examples one process sees, and nothing is
dropped at a pass boundary. A halted slot (ACT) simply takes the next index of its rank's
stream: nothing is loaded and thrown away. Both orders (`train.sampler`) are `Stream`s
(dis_core.contract.interfaces):

- `ExampleStream` ("examples"): seeded per-epoch permutations of the individual examples.
- `GroupStream` ("groups"): the reference TRM/DIS sampler. A pass is a seeded permutation of the
  groups (an original puzzle with all its augmented variants); each group contributes one random
  member puzzle, whose examples follow contiguously in a random order. The reference cuts a
  puzzle at a batch boundary and drops the rest, and drops a pass's last partial batch; here the
  stream just goes on, so the rest of a cut puzzle opens the next batch and nothing is dropped.
"""

from __future__ import annotations

import numpy as np
import torch

from dis_core.contract.checks import BatchCheck
from dis_core.contract.errors import PluginError, UserError
from dis_core.contract.interfaces import Batch, Dataset, GroupedDataset, PuzzleGroups, Stream


def _global_positions(taken: int, k: int, local_batch: int, global_batch: int, rank: int) -> np.ndarray:
    """Stream positions of a rank's next k examples, when it has taken `taken` so far."""
    g, j = np.divmod(np.arange(taken, taken + k), local_batch)
    return g * global_batch + rank * local_batch + j


def _check_resumable(stream, state: dict) -> None:
    # Checkpoints from before `train.sampler` existed hold no name: they came from ExampleStream.
    saved = state.get("sampler", "examples")
    if saved != stream.sampler:
        raise UserError(f"--resume: the checkpoint's data position is in the {saved!r} order, the recipe asks for "
                        f"{stream.sampler!r}; set train.sampler = {saved!r} to resume this run")


class ExampleStream:
    """Seeded per-epoch permutations of the examples (`train.sampler = "examples"`)."""

    sampler = "examples"

    def __init__(self, size: int, global_batch: int, rank: int, world: int, seed: int):
        if size <= 0:
            raise ValueError("the training split is empty")
        self.size, self.global_batch, self.rank, self.world, self.seed = size, global_batch, rank, world, seed
        self.local_batch = global_batch // world
        self.taken = 0  # examples this rank has taken so far (the resumable position)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._perm_epoch = epoch
        return self._perm

    def take(self, k: int) -> np.ndarray:
        pos = _global_positions(self.taken, k, self.local_batch, self.global_batch, self.rank)
        self.taken += k
        epoch, offset = np.divmod(pos, self.size)
        out = np.empty(k, dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self._permutation(int(e))[offset[sel]]
        return out

    def epochs_done(self) -> float:
        """Passes over the split by all ranks together (exact when ranks take equally)."""
        return self.taken * self.world / self.size

    def state_dict(self) -> dict:
        return {"taken": self.taken, "sampler": self.sampler}

    def load_state_dict(self, state: dict) -> None:
        _check_resumable(self, state)
        self.taken = int(state["taken"])


class GroupStream:
    """The reference's group order (`train.sampler = "groups"`), see the module docstring.

    Pass p draws from generators seeded with (seed, p, 0) (which member each group shows) and
    (seed, p, 1) (group order, order inside each puzzle), so any position is found without
    replaying the stream. Passes differ in length when a group's members differ in size; their
    cumulative lengths map stream positions to passes.
    """

    sampler = "groups"

    def __init__(self, groups: PuzzleGroups, size: int, global_batch: int, rank: int, world: int, seed: int):
        self.size, self.global_batch, self.rank, self.world, self.seed = size, global_batch, rank, world, seed
        self.local_batch = global_batch // world
        self.taken = 0  # examples this rank has taken so far (the resumable position)
        self.start, self.puzzle_size = groups.puzzle_start, groups.puzzle_size
        self.first = groups.group_offsets[:-1]  # (G,) each group's first member puzzle
        self.members = np.diff(groups.group_offsets)  # (G,) member puzzles per group
        # Equal-sized members (ARC's variants are) make every pass equally long: no table needed.
        uniform = np.array_equal(self.puzzle_size, np.repeat(self.puzzle_size[self.first], self.members))
        self.pass_len = int(self.puzzle_size[self.first].sum()) if uniform else None
        self.ends = np.zeros(1, dtype=np.int64)  # [0, end of pass 0, end of pass 1, ...] when lengths vary
        self._order_pass = -1
        self._order: np.ndarray | None = None

    def _chosen(self, p: int) -> np.ndarray:
        """(G,) the member puzzle each group shows in pass p."""
        return self.first + np.random.default_rng([self.seed, p, 0]).integers(0, self.members)

    def _locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pass, offset in the pass) of global stream positions."""
        if self.pass_len is not None:
            return np.divmod(pos, self.pass_len)
        while self.ends[-1] <= pos.max(initial=0):  # extend the table 64 passes at a time
            n = len(self.ends) - 1
            lengths = [self.puzzle_size[self._chosen(p)].sum() for p in range(n, n + 64)]
            self.ends = np.concatenate([self.ends, self.ends[-1] + np.cumsum(lengths)])
        p = np.searchsorted(self.ends, pos, side="right") - 1
        return p, pos - self.ends[p]

    def _pass_order(self, p: int) -> np.ndarray:
        """Dataset indices of pass p, in stream order."""
        if p != self._order_pass:
            rng = np.random.default_rng([self.seed, p, 1])
            chosen = self._chosen(p)[rng.permutation(len(self.first))]
            start, size = self.start[chosen], self.puzzle_size[chosen]
            puzzle = np.repeat(np.arange(len(chosen)), size)  # position of each example's puzzle in the pass
            within = np.arange(len(puzzle)) - np.repeat(np.cumsum(size) - size, size)
            shuffle = np.lexsort((rng.random(len(puzzle)), puzzle))  # puzzles stay in place, their examples shuffle
            self._order = (np.repeat(start, size) + within)[shuffle]
            self._order_pass = p
        return self._order

    def take(self, k: int) -> np.ndarray:
        pos = _global_positions(self.taken, k, self.local_batch, self.global_batch, self.rank)
        self.taken += k
        passes, offset = self._locate(pos)
        out = np.empty(k, dtype=np.int64)
        for p in np.unique(passes):
            sel = passes == p
            out[sel] = self._pass_order(int(p))[offset[sel]]
        return out

    def epochs_done(self) -> float:
        """Examples taken by all ranks over the split's size: the same epoch as ExampleStream's,
        so `train.epochs` and `train/epoch` mean one thing whichever the sampler."""
        return self.taken * self.world / self.size

    def state_dict(self) -> dict:
        return {"taken": self.taken, "sampler": self.sampler}

    def load_state_dict(self, state: dict) -> None:
        _check_resumable(self, state)
        self.taken = int(state["taken"])


def check_groups(groups: PuzzleGroups, size: int, task: str) -> None:
    """A task's `groups()` must describe non-empty puzzles inside the split and non-empty groups."""
    start, n, offsets = groups.puzzle_start, groups.puzzle_size, groups.group_offsets
    problems = []
    if len(start) != len(n):
        problems.append(f"puzzle_start has {len(start)} entries, puzzle_size {len(n)}")
    elif len(n) and (n.min() < 1 or start.min() < 0 or (start + n).max() > size):
        problems.append(f"a puzzle is empty or outside the split's {size} examples")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(n) or np.any(np.diff(offsets) < 1):
        problems.append(f"group_offsets must rise strictly from 0 to {len(n)} (every group has a member puzzle)")
    if problems:
        raise PluginError(f"task {task!r}: its training split's groups() is malformed: " + "; ".join(problems))


def make_stream(dataset: Dataset, sampler: str, global_batch: int, rank: int, world: int, seed: int, task: str) -> Stream:
    """The training stream (a `Stream`) `train.sampler` asks for: "groups" needs the split's optional
    `groups()`, "auto" uses it when the split has it, "examples" never does."""
    groups = dataset.groups() if sampler != "examples" and isinstance(dataset, GroupedDataset) else None
    if sampler == "groups" and groups is None:
        raise UserError(f"train.sampler = \"groups\": the training split of task {task!r} declares no puzzle groups "
                        f"(Dataset.groups()); use \"examples\" or \"auto\"")
    if groups is None or len(dataset) == 0:  # (an empty split is refused by ExampleStream)
        return ExampleStream(len(dataset), global_batch, rank, world, seed)
    check_groups(groups, len(dataset), task)
    return GroupStream(groups, len(dataset), global_batch, rank, world, seed)


def to_torch(arrays: dict[str, np.ndarray], device: torch.device | str = "cpu") -> Batch:
    out = {}
    for key, value in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(value))
        if t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
            t = t.long()  # token ids and indices are int64 everywhere in the trainer
        out[key] = t.to(device)
    return out


def fetch(dataset: Dataset, indices: np.ndarray, device: torch.device | str = "cpu", check: BatchCheck | None = None) -> Batch:
    """The examples `indices` as tensors on `device`. What `get` returns is checked first (cheap:
    numpy, before any copy to the device): `check` (`Boundary.batch`) names the task and its
    plugin and checks against its spec; without it only the spec-free part is checked."""
    idx = np.asarray(indices, dtype=np.int64)
    arrays = dataset.get(idx)
    (check or BatchCheck())(arrays, idx)
    return to_torch(arrays, device)


def eval_chunks(size: int, batch: int, rank: int, world: int):
    """Sequential test batches, sliced per rank: yields (indices, n_real); the last slice of a
    rank is padded by repeating its final index (flagged by n_real) so shapes stay fixed."""
    local = batch // world
    for start in range(0, size, batch):
        lo = min(start + rank * local, size)
        hi = min(lo + local, size)
        idx = np.arange(lo, hi, dtype=np.int64)
        n_real = len(idx)
        if n_real == 0:
            idx = np.zeros(local, dtype=np.int64)
        elif n_real < local:
            idx = np.concatenate([idx, np.full(local - n_real, idx[-1], dtype=np.int64)])
        yield idx, n_real
