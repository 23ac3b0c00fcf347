"""Dihedral x colour-permutation variants of a puzzle, deduplicated, and counter-based hashing.

The reference draws up to 5*num_aug attempts per puzzle (a transform t ~ U{0..7} and a
permutation of colours 1..9, black fixed), hashes each augmented puzzle and keeps the first
num_aug that differ from the original and from each other. Hashing whole puzzles is what makes
its build slow, so here each attempt gets an exact *canonical key* instead:

  a variant's content is m[D_t(P)]; it depends only on t and on m restricted to the colours U
  that P uses. Two transforms t, t' give related contents when D_t(P) = f[D_t'(P)] for some
  colour bijection f (a symmetric puzzle, possibly up to a recolouring); then
  m[D_t(P)] = (m o f)[D_t'(P)]. Mapping each t to the smallest such t' (its class
  representative) with its f, the key (representative, (m o f)|U) is equal for two attempts
  exactly when their augmented puzzles are equal.

Keys are small integers, so a puzzle's 5000 attempts are deduplicated with one `np.unique`.
The one difference from the reference: it hashes the *sorted* list of pair hashes, so it also
merges two variants whose pairs are the same up to reordering (only possible when one pair of a
puzzle is a transform of another); those rare variants are kept here as distinct.

Translations and the variant rotation are drawn by `hash_uniform`, a splitmix64 counter hash of
integer keys, so any example can be rebuilt from its index alone.
"""

from __future__ import annotations

import numpy as np

from .encoding import dihedral

RETRY_FACTOR = 5  # attempts per wanted variant, as the reference
IDENTITY = np.arange(10, dtype=np.uint8)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash_uniform(n, *keys) -> np.ndarray:
    """Integers in [0, n) as a pure function of the integer key arrays (broadcast together)."""
    arrays = np.broadcast_arrays(*(np.atleast_1d(np.asarray(k, dtype=np.int64)) for k in keys))
    h = np.zeros(arrays[0].shape, dtype=np.uint64)
    for a in arrays:
        h = _mix(h ^ a.astype(np.uint64))
    return ((h >> np.uint64(11)) % np.asarray(n).astype(np.uint64)).astype(np.int64)


def _colour_bijection(src: list[np.ndarray], dst: list[np.ndarray]) -> np.ndarray | None:
    """f (10,) with f[src] == dst grid by grid, black to black, or None if there is none."""
    if any(a.shape != b.shape for a, b in zip(src, dst)):
        return None
    a = np.concatenate([g.ravel() for g in src]).astype(np.int64)
    b = np.concatenate([g.ravel() for g in dst]).astype(np.int64)
    pairs = np.unique(a * 10 + b)
    pa, pb = pairs // 10, pairs % 10
    if len(np.unique(pa)) != len(pairs) or len(np.unique(pb)) != len(pairs) or np.any((pa == 0) != (pb == 0)):
        return None
    f = IDENTITY.copy()
    f[pa] = pb
    return f


def dihedral_classes(grids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(representative (8,), f (8, 10)): D_t(P) == f[t][D_rep[t](P)] for every transform t."""
    images = [[dihedral(g, t) for g in grids] for t in range(8)]
    rep = np.arange(8)
    f = np.tile(IDENTITY, (8, 1))
    for t in range(1, 8):
        for r in range(t):
            if rep[r] != r:
                continue
            found = _colour_bijection(images[r], images[t])
            if found is not None:
                rep[t], f[t] = r, found
                break
    return rep, f


def generate_variants(grids: list[np.ndarray], num_aug: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(tids (V,) uint8, colour maps (V, 10) uint8) of a puzzle's variants, V <= 1 + num_aug.

    Row 0 is the original (identity); rows 1.. are the accepted attempts in the order the
    reference's sequential loop would accept them.
    """
    tids = np.zeros(1, dtype=np.uint8)
    maps = IDENTITY[None].copy()
    if num_aug <= 0:
        return tids, maps
    attempts = RETRY_FACTOR * num_aug
    t = rng.integers(0, 8, attempts)
    perms = rng.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (attempts, 1)), axis=1)
    m = np.concatenate([np.zeros((attempts, 1), dtype=np.uint8), perms], axis=1)  # (A, 10), black fixed
    used = np.unique(np.concatenate([g.ravel() for g in grids]))
    used = used[used != 0]
    rep, f = dihedral_classes(grids)
    composed = np.take_along_axis(m, f[t][:, used].astype(np.int64), axis=1).astype(np.int64)  # (A, |U|): (m o f)|U
    shifts = 3 + 4 * np.arange(len(used), dtype=np.int64)
    codes = rep[t] + (composed << shifts).sum(axis=1)
    original = int((used.astype(np.int64) << shifts).sum())  # t 0 is its own representative, f = identity
    _, first = np.unique(codes, return_index=True)
    first = np.sort(first[codes[first] != original])[:num_aug]
    return np.concatenate([tids, t[first].astype(np.uint8)]), np.concatenate([maps, m[first]])
