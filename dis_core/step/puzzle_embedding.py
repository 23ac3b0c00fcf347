"""The sparse per-puzzle embedding table E(p) and its sign-SGD update.

The table is large (one row per puzzle variant: ~877k rows for ARC-1 + ConceptARC, 0.9 GB
at 256 dims in fp32) and each step touches only the rows of its batch, so it is a buffer, not
a parameter: it stays out of the dense optimizer, DeepSpeed's engine, gradient all-reduce,
EMA and the parameter count, and it is saved with `state_dict()` like any buffer.

Training forward copies the batch's rows into a fresh leaf tensor that requires grad, so the
backward pass leaves the gradient there (B rows, not a table-sized gradient). `step` then:
  1. gathers ids and row gradients from every rank (all_gather; ranks may hold different
     numbers of rows), so every rank sees the same update;
  2. sums the gradients of duplicate ids;
  3. for those rows only: w <- w * (1 - lr * wd) - lr * sign(g)   (decoupled weight decay).
Every rank computes the update from the same gathered data, and rank 0 broadcasts its new rows
so that the replicated tables stay bit-identical (TRM's `CastedSparseEmbeddingSignSGD_Distributed`,
docs/reference.md#sparse-puzzle-embedding, minus its reliance on identical float summation order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class PuzzleEmbedding(nn.Module):
    def __init__(self, num_ids: int, dim: int):
        super().__init__()
        if num_ids <= 0 or dim <= 0:
            raise ValueError(f"PuzzleEmbedding needs num_ids > 0 and dim > 0, got {num_ids}, {dim}")
        self.num_ids, self.dim = num_ids, dim
        # Zero init: every puzzle starts from the same (empty) prefix, as in the reference.
        self.register_buffer("weights", torch.zeros(num_ids, dim, dtype=torch.float32), persistent=True)
        self._pending: list[tuple[Tensor, Tensor]] = []  # (ids, leaf rows) of training forwards since the last step

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B,) int64 -> rows (B, dim) fp32."""
        if not (self.training and torch.is_grad_enabled()):
            return self.weights[ids]
        rows = self.weights[ids].detach().requires_grad_(True)  # (B, dim) leaf: the grad lands here
        self._pending.append((ids.detach(), rows))
        return rows

    @torch.no_grad()
    def step(self, lr: float, weight_decay: float) -> None:
        """Apply sign-SGD to the rows used since the last step, on every rank alike.

        Collective when torch.distributed is initialised with world > 1: every rank must call it,
        even one that ran no training forward.
        """
        device = self.weights.device
        if self._pending:
            ids = torch.cat([i.reshape(-1).to(device) for i, _ in self._pending])
            grads = torch.cat([r.grad if r.grad is not None else torch.zeros_like(r) for _, r in self._pending]).float()
        else:
            ids = torch.zeros(0, dtype=torch.long, device=device)
            grads = torch.zeros(0, self.dim, dtype=torch.float32, device=device)
        self._pending.clear()
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            ids, grads = _all_gather_rows(ids, grads)
        if ids.numel() == 0:
            return
        rows, inverse = torch.unique(ids, return_inverse=True)  # sorted, so the same on every rank
        summed = torch.zeros(len(rows), self.dim, dtype=torch.float32, device=device).index_add_(0, inverse, grads)  # (U, dim)
        new = self.weights[rows] * (1.0 - lr * weight_decay) - lr * torch.sign(summed)
        if distributed:
            # GPU index_add_ sums duplicates in a racy order; a sum near zero could then take a
            # different sign on another rank. Rank 0's rows are authoritative (a few hundred KB).
            dist.broadcast(new, src=0)
        self.weights[rows] = new

    def pending_rows(self) -> list[Tensor]:
        """The leaf rows of the training forwards since the last step (their grads are what
        `step` applies)."""
        return [rows for _, rows in self._pending]

    def discard_pending(self) -> None:
        """Forget the rows used since the last step (a skipped, non-finite update)."""
        self._pending.clear()

    def memory_bytes(self) -> int:
        """Bytes held: the table plus the rows awaiting a step."""
        pending = sum(r.numel() * r.element_size() * 2 for _, r in self._pending)  # rows and their grads
        return self.weights.numel() * self.weights.element_size() + pending

    def extra_repr(self) -> str:
        return f"num_ids={self.num_ids}, dim={self.dim}, {self.memory_bytes() / 2**20:.1f} MiB"


def _all_gather_rows(ids: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate every rank's (ids, grads) in rank order; ranks may hold different counts."""
    world = dist.get_world_size()
    count = torch.tensor([ids.numel()], dtype=torch.long, device=ids.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    most = max(counts)
    if most == 0:
        return ids, grads
    pad = most - ids.numel()
    ids_p = torch.cat([ids, ids.new_zeros(pad)])
    grads_p = torch.cat([grads, grads.new_zeros(pad, grads.shape[1])])
    all_ids = [torch.empty_like(ids_p) for _ in range(world)]
    all_grads = [torch.empty_like(grads_p) for _ in range(world)]
    dist.all_gather(all_ids, ids_p)
    dist.all_gather(all_grads, grads_p)
    return (
        torch.cat([t[:c] for t, c in zip(all_ids, counts)]),
        torch.cat([t[:c] for t, c in zip(all_grads, counts)]),
    )
