"""The reveal rule of DIS target paths, written once.

A path from a start sequence to an end sequence reveals an example's n cells one group per
frame: frame s (s = 1..N, N = n_sup) shows the end token on the first floor(s * n / N) cells of
a per-example order and the start token everywhere else. Frame N is the end sequence, the
frames are nested (a revealed cell stays revealed), and n < N just repeats frames. The order is
the caller's: random for the `reveal_path` generator, the solver's for tasks that offer a
`solver_trajectory` (the `solver_edits` generator).
"""

from __future__ import annotations

import torch

from dis_core.contract.interfaces import IGNORE


def reveal_counts(n: torch.Tensor, n_sup: int) -> torch.Tensor:
    """n (B,) cells to reveal -> (B, N) int64: floor(s * n / N), the cells shown by frame s."""
    s = torch.arange(1, n_sup + 1, device=n.device)  # frames 1..N (frame 0 = the start is no target)
    return (s[None, :] * n[:, None]) // n_sup


def reveal_frames(start: torch.Tensor, end: torch.Tensor, order: torch.Tensor, n: torch.Tensor, n_sup: int) -> torch.Tensor:
    """start, end (B, L); order (B, L) int64, a permutation of the cells per example whose first
    n[b] entries are the cells to reveal, in reveal order; n (B,) -> (B, N, L) frames, dtype of
    `end`: frame s-1 holds `end` on order[b, :floor(s * n[b] / N)] and `start` elsewhere."""
    B, L = order.shape
    place = torch.empty_like(order)  # place[b, p] = position of cell p in example b's order
    place.scatter_(-1, order, torch.arange(L, device=order.device).expand(B, L))
    k = reveal_counts(n, n_sup)  # (B, N)
    revealed = place[:, None, :] < k[:, :, None]  # (B, N, L), nested because k grows with s
    return torch.where(revealed, end[:, None, :], start[:, None, :])


def ranked_reveal(inputs: torch.Tensor, labels: torch.Tensor, rank: torch.Tensor, n_sup: int) -> torch.Tensor:
    """Frames from a per-cell solve order, the way solver-ordered tasks build their
    `solver_trajectory`: inputs, labels (B, L) int64; rank (B, L) int64, smaller = fixed
    earlier (only cells where inputs != labels are looked at; ties keep position order)
    -> (B, N, L) int64.

    Frame s-1 (s = 1..N) takes labels on the first floor(s * missing / N) differing cells and
    inputs elsewhere; cells whose label is IGNORE stay IGNORE in every frame."""
    supervised = labels != IGNORE
    diff = (inputs != labels) & supervised  # (B, L) the cells a solver has to fill
    key = torch.where(diff, rank, torch.full_like(rank, torch.iinfo(torch.int64).max))
    order = torch.sort(key, dim=1, stable=True).indices  # (B, L) differing cells first, in rank order
    frames = reveal_frames(inputs, labels, order, diff.sum(1), n_sup)
    return torch.where(supervised[:, None, :], frames, torch.full_like(frames, IGNORE))
