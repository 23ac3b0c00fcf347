"""ARC grids <-> token canvases, the 8 dihedral transforms, and the evaluator's crop.

Tokens (the reference encoding, docs/reference.md#tokens-and-canvas): PAD 0, EOS 1, colour c -> c + 2.
A grid of shape (h, w) placed at (r0, c0) on the 30x30 canvas (or a smaller square canvas, the
`canvas` option, for small-grid recipes: the side is that of the grids handed to `render`, and
`crop` reads it from the row length) is followed by an EOS row at
row r0+h over its columns and an EOS column at column c0+w over its rows, each only where it
fits; the diagonal corner (r0+h, c0+w) stays PAD.

Dihedral transform ids are the reference's: 0 identity, 1 rot90, 2 rot180, 3 rot270 (numpy's
counter-clockwise `rot90`), 4 flip left-right, 5 flip up-down, 6 transpose, 7 anti-transpose
(= fliplr(rot90)). `INVERSE[t]` undoes `t`.
"""

from __future__ import annotations

import numpy as np

PAD, EOS, COLOUR0 = 0, 1, 2
VOCAB_SIZE = 12
SIDE = 30
SEQ_LEN = SIDE * SIDE

INVERSE = np.array([0, 3, 2, 1, 4, 5, 6, 7], dtype=np.int64)
SWAPS_AXES = np.array([False, True, False, True, False, False, True, True])  # output shape is (w, h)

# Source cell of output cell (i, j) for a grid of shape (h, w), for each transform:
#   a = A_H[t]*(h-1) + A_I[t]*i + A_J[t]*j,   b = B_W[t]*(w-1) + B_I[t]*i + B_J[t]*j.
# Written out: t1 rot90 reads (j, w-1-i); t3 rot270 reads (h-1-j, i); t7 reads (h-1-j, w-1-i).
_A_H = np.array([0, 0, 1, 1, 0, 1, 0, 1])
_A_I = np.array([1, 0, -1, 0, 1, -1, 0, 0])
_A_J = np.array([0, 1, 0, -1, 0, 0, 1, -1])
_B_W = np.array([0, 1, 1, 0, 1, 0, 0, 1])
_B_I = np.array([0, -1, 0, 1, 0, 0, 1, -1])
_B_J = np.array([1, 0, -1, 0, -1, 1, 0, 0])


def dihedral(grid: np.ndarray, t: int) -> np.ndarray:
    """One grid (h, w) under transform t (the plain numpy definition; `render` must agree)."""
    ops = (
        lambda g: g,
        np.rot90,
        lambda g: np.rot90(g, 2),
        lambda g: np.rot90(g, 3),
        np.fliplr,
        np.flipud,
        lambda g: g.T,
        lambda g: np.fliplr(np.rot90(g)),
    )
    return np.ascontiguousarray(ops[int(t)](grid))


def transformed_shape(h: np.ndarray, w: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    swap = SWAPS_AXES[t]
    return np.where(swap, w, h), np.where(swap, h, w)


def render(
    grids: np.ndarray,  # (K, S, S) uint8 colours 0..9 at the top-left, anything elsewhere; S is the canvas side (30)
    shapes: np.ndarray,  # (K, 2) (h, w) of each grid
    tids: np.ndarray,  # (K,) dihedral transform ids
    cmaps: np.ndarray,  # (K, 10) colour maps: new colour = cmap[old]
    r0: np.ndarray,  # (K,) row offset of the transformed grid on the canvas
    c0: np.ndarray,  # (K,) column offset
) -> np.ndarray:
    """Tokens (K, S*S) uint8 of each grid, transformed, recoloured and placed: a single gather,
    so a whole batch costs a few vectorised passes over (K, S, S). The grids' block side S is the
    canvas side, so a smaller canvas needs no other argument (and 30 is exactly the reference)."""
    k, side = len(grids), grids.shape[-1]
    t = np.asarray(tids, dtype=np.int64).reshape(k, 1, 1)
    h = np.asarray(shapes[:, 0], dtype=np.int64).reshape(k, 1, 1)
    w = np.asarray(shapes[:, 1], dtype=np.int64).reshape(k, 1, 1)
    h2, w2 = transformed_shape(h, w, t)
    i = np.arange(side).reshape(1, side, 1) - np.asarray(r0, dtype=np.int64).reshape(k, 1, 1)  # (K, S, 1) row in the grid
    j = np.arange(side).reshape(1, 1, side) - np.asarray(c0, dtype=np.int64).reshape(k, 1, 1)  # (K, 1, S)
    rows_in, cols_in = (i >= 0) & (i < h2), (j >= 0) & (j < w2)
    inside = rows_in & cols_in  # (K, 30, 30)
    a = _A_H[t] * (h - 1) + _A_I[t] * i + _A_J[t] * j
    b = _B_W[t] * (w - 1) + _B_I[t] * i + _B_J[t] * j
    src = np.where(inside, a * side + b, 0).reshape(k, side * side)
    colours = np.take_along_axis(grids.reshape(k, side * side), src, axis=1)  # (K, S*S) original colours
    tokens = np.take_along_axis(np.asarray(cmaps, dtype=np.uint8), colours.astype(np.int64), axis=1) + COLOUR0
    eos = ((i == h2) & cols_in) | ((j == w2) & rows_in)
    out = np.where(inside.reshape(k, side * side), tokens, np.where(eos.reshape(k, side * side), EOS, PAD))
    return out.astype(np.uint8)


def crop(tokens: np.ndarray) -> list[np.ndarray]:
    """The reference's answer crop, for (B, S*S) token rows -> B grids of colours 0..9 (S = 30, or
    the side of a smaller canvas: read from the row length, which must be a square).

    For each r = 1..S the usable width is the running minimum, over rows 0..r-1, of each row's
    leading run of colour tokens; the (r, width) of maximal area wins (the first on ties), and
    an all-PAD row 0 gives an empty (0, 0) grid.
    """
    tokens = np.asarray(tokens)
    side = canvas_side(tokens.shape[-1])
    x = tokens.reshape(-1, side, side)
    is_colour = (x >= COLOUR0) & (x < VOCAB_SIZE)
    lead = np.where(is_colour.all(axis=2), side, np.argmin(is_colour, axis=2))  # (B, S)
    width = np.minimum.accumulate(lead, axis=1)
    area = width * np.arange(1, side + 1)
    r = np.argmax(area, axis=1) + 1
    w = width[np.arange(len(x)), r - 1]
    r = np.where(w == 0, 0, r)
    return [(x[b, : r[b], : w[b]].astype(np.int64) - COLOUR0).astype(np.uint8) for b in range(len(x))]


def canvas_side(seq_len: int) -> int:
    """The side S of a square canvas of `seq_len` = S*S tokens (900 -> 30)."""
    side = int(round(seq_len ** 0.5))
    if side * side != seq_len:
        raise ValueError(f"ARC token rows must be a square canvas (S*S tokens), got {seq_len}")
    return side


def invert(grid: np.ndarray, tid: int, cmap: np.ndarray) -> np.ndarray:
    """Undo an augmentation on a colour grid: the inverse dihedral, then the inverse colour map."""
    inverse_map = np.argsort(np.asarray(cmap)).astype(np.uint8)
    return inverse_map[dihedral(grid, INVERSE[int(tid)])]


def grid_key(grid: np.ndarray) -> bytes:
    """An exact, hashable identity of a grid: its shape bytes then its cells (the reference
    hashes the same bytes with SHA-256; the raw bytes also let the grid be rebuilt)."""
    g = np.asarray(grid, dtype=np.uint8)
    return bytes(g.shape) + g.tobytes()


def grid_from_key(key: bytes) -> list[list[int]]:
    h, w = key[0], key[1]
    return np.frombuffer(key[2:], dtype=np.uint8).reshape(h, w).tolist()
