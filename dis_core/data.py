"""Feeding examples: a resumable per-rank index stream, and numpy -> torch batches.

The stream is the concatenation of seeded per-epoch permutations of the split. Global batch g
covers stream positions [g*G, (g+1)*G); rank r owns the r-th contiguous slice of it. So two
processes with half the batch each see exactly the examples one process sees, and no example is
dropped at an epoch boundary. A halted slot (ACT) simply takes the next index of its rank's
stream: nothing is loaded and thrown away.
"""

from __future__ import annotations

import numpy as np
import torch

from dis_core.interfaces import Batch, Dataset


class ExampleStream:
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
        local = np.arange(self.taken, self.taken + k)
        self.taken += k
        g, j = np.divmod(local, self.local_batch)
        pos = g * self.global_batch + self.rank * self.local_batch + j  # global stream positions
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
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = int(state["taken"])


def to_torch(arrays: dict[str, np.ndarray], device: torch.device | str = "cpu") -> Batch:
    out = {}
    for key, value in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(value))
        if t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
            t = t.long()  # token ids and indices are int64 everywhere in the trainer
        out[key] = t.to(device)
    return out


def fetch(dataset: Dataset, indices: np.ndarray, device: torch.device | str = "cpu") -> Batch:
    return to_torch(dataset.get(np.asarray(indices, dtype=np.int64)), device)


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
