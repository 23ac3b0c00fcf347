"""Sudoku puzzles: the board geometry, a solver, the seeded generator and the Sudoku-Extreme CSV
layout (docs/reference.md#sudoku-extreme-builder). The `sudoku` task and evaluator are in sudoku.py.

A bitmask constraint-propagation solver (naked and hidden singles, then guessing on the cell
with fewest candidates) fills a random grid and removes clues in random order while the
solution stays unique, giving minimal puzzles. A puzzle's *difficulty* is the number of dead
ends (guesses that propagation refutes) in the complete search that proves uniqueness: 0 means
singles alone solve it. Grids here are digits (0 blank); tokens are the task's business.
"""

from __future__ import annotations

import random
import time

import numpy as np

from dis_core.contract.errors import DataError, UserError
from dis_core.contract.logs import progress
from dis_plugins.tasks.puzzle_csv import csv_path, puzzle_rows, raise_first


class Geometry:
    """An n x n board of box_rows x box_cols boxes; candidate sets are n-bit masks."""

    def __init__(self, box_rows: int, box_cols: int):
        n = box_rows * box_cols
        self.n, self.box_rows, self.box_cols, self.cells = n, box_rows, box_cols, n * n
        self.full = (1 << n) - 1
        rows = [[r * n + c for c in range(n)] for r in range(n)]
        cols = [[r * n + c for r in range(n)] for c in range(n)]
        boxes = [
            [(r0 + i) * n + c0 + j for i in range(box_rows) for j in range(box_cols)]
            for r0 in range(0, n, box_rows)
            for c0 in range(0, n, box_cols)
        ]
        self.units = [tuple(u) for u in rows + cols + boxes]
        self.unit_index = np.array(self.units, dtype=np.int64)  # (3n, n) for vectorised checks
        peers = [set() for _ in range(self.cells)]
        for u in self.units:
            for c in u:
                peers[c].update(u)
        self.peers = [tuple(sorted(p - {c})) for c, p in enumerate(peers)]

    @classmethod
    def from_size(cls, size: int) -> "Geometry":
        rows = max(d for d in range(1, int(size**0.5) + 1) if size % d == 0)
        return cls(rows, size // rows)


# ---- solver ---------------------------------------------------------------------------------


def _propagate(geo: Geometry, cand: list[int], queue: list[int], trail: list[int] | None) -> bool:
    """Eliminate the digits of fixed cells from their peers and place hidden singles, until
    nothing changes. False on a contradiction. `trail` collects cells in the order fixed."""
    peers, full = geo.peers, geo.full
    while True:
        while queue:
            c = queue.pop()
            b = cand[c]
            for p in peers[c]:
                v = cand[p]
                if v & b:
                    v ^= b
                    if not v:
                        return False
                    cand[p] = v
                    if not v & (v - 1):
                        queue.append(p)
                        if trail is not None:
                            trail.append(p)
        for u in geo.units:  # hidden singles: a digit with one possible cell in a unit
            once = twice = 0
            for c in u:
                v = cand[c]
                twice |= once & v
                once |= v
            if once != full:
                return False
            only = once & ~twice
            if only:
                for c in u:
                    v = cand[c]
                    h = v & only
                    if h and v != h:
                        if h & (h - 1):
                            return False
                        cand[c] = h
                        queue.append(c)
                        if trail is not None:
                            trail.append(c)
        if not queue:
            return True


def _search(geo, cand, limit, found, stats, rng, trail) -> None:
    best, fewest = -1, geo.n + 1
    for c in range(geo.cells):
        v = cand[c]
        if v & (v - 1) and v.bit_count() < fewest:
            best, fewest = c, v.bit_count()
            if fewest == 2:
                break
    if best < 0:
        found.append((cand, trail))
        return
    bits, v = [], cand[best]
    while v:
        bits.append(v & -v)
        v &= v - 1
    if rng is not None:
        rng.shuffle(bits)
    for b in bits:
        new = cand[:]
        new[best] = b
        t = None if trail is None else trail + [best]
        if _propagate(geo, new, [best], t):
            _search(geo, new, limit, found, stats, rng, t)
            if len(found) >= limit:
                return
        else:
            stats[0] += 1


def solve(geo: Geometry, grid, limit: int = 2, rng: random.Random | None = None, with_order: bool = False):
    """grid: n*n digits (0 blank) -> (solutions as digit lists (at most `limit`), dead ends,
    order of the cells fixed on the way to the first solution or None)."""
    cand = [geo.full] * geo.cells
    queue = [c for c, d in enumerate(grid) if d]
    for c in queue:
        cand[c] = 1 << (int(grid[c]) - 1)
    found, stats = [], [0]
    trail = [] if with_order else None
    if _propagate(geo, cand, queue, trail):
        _search(geo, cand, limit, found, stats, rng, trail)
    solutions = [[b.bit_length() for b in f[0]] for f in found]
    return solutions, stats[0], (found[0][1] if found and with_order else None)


def _has_other_solution(geo: Geometry, grid: list[int], cell: int, digit: int) -> bool:
    """Whether the blank `cell` can hold anything but `digit`: the uniqueness test of one
    clue removal, cheaper than counting solutions because it stops at the first one."""
    cand = [geo.full] * geo.cells
    queue = [c for c, d in enumerate(grid) if d]
    for c in queue:
        cand[c] = 1 << (grid[c] - 1)
    cand[cell] = geo.full & ~(1 << (digit - 1))
    if not cand[cell] & (cand[cell] - 1):
        queue.append(cell)
    found = []
    if _propagate(geo, cand, queue, None):
        _search(geo, cand, 1, found, [0], None, None)
    return bool(found)


def make_puzzle(geo: Geometry, rng: random.Random):
    """A random minimal puzzle -> (question, solution, difficulty, fix order)."""
    solution = solve(geo, [0] * geo.cells, limit=1, rng=rng)[0][0]
    grid = solution[:]
    cells = list(range(geo.cells))
    rng.shuffle(cells)
    for c in cells:
        d, grid[c] = grid[c], 0
        if _has_other_solution(geo, grid, c, d):
            grid[c] = d
    _, dead_ends, order = solve(geo, grid, limit=2, with_order=True)
    return grid, solution, dead_ends, order


def rank_of(order: list[int], cells: int) -> np.ndarray:
    rank = np.full(cells, -1, dtype=np.int16)  # -1: a given (never revealed)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(len(order), dtype=np.int16)
    return rank


def generate_bank(geo: Geometry, count: int, seed: int, min_difficulty: int, exclude: set[bytes]) -> dict:
    rng = random.Random(seed)
    rows, seen, attempts, started = [], set(exclude), 0, time.time()
    bar = progress(count, f"sudoku {geo.n}x{geo.n} puzzles", unit="puzzle")
    while len(rows) < count:
        attempts += 1
        q, s, difficulty, order = make_puzzle(geo, rng)
        key = bytes(q)
        if difficulty >= min_difficulty and key not in seen:
            seen.add(key)
            rows.append((q, s, difficulty, rank_of(order, geo.cells)))
            bar.update(1)
        if (attempts >= 5000 and not rows) or attempts > 200 * count + 5000:
            raise UserError(
                f"task sudoku: only {len(rows)} of {count} distinct {geo.n}x{geo.n} puzzles with "
                f"difficulty >= {min_difficulty} after {attempts} attempts; lower min_difficulty or the count"
            )
    bar.close()
    rate = len(rows) / max(time.time() - started, 1e-9)
    return {
        "question": np.array([r[0] for r in rows], dtype=np.uint8).reshape(count, geo.cells),
        "solution": np.array([r[1] for r in rows], dtype=np.uint8).reshape(count, geo.cells),
        "difficulty": np.array([r[2] for r in rows], dtype=np.int32),
        "rank": np.array([r[3] for r in rows], dtype=np.int16).reshape(count, geo.cells),
    }, rate


# ---- the Sudoku-Extreme CSV layout ----------------------------------------------------------

_DIGIT = np.full(256, 255, dtype=np.uint8)  # char code -> digit, 255 = not allowed
_DIGIT[ord(".")] = _DIGIT[ord("0")] = 0
_DIGIT[[ord(str(d)) for d in range(1, 10)]] = np.arange(1, 10)


def read_csv(path: str, geo: Geometry, min_difficulty: int, key: str) -> dict:
    """`source,question,answer,rating` rows -> bank arrays; DataError names file and line."""
    p = csv_path(path, "sudoku", key)
    if geo.n > 9:
        raise UserError(f"task sudoku: {key} holds one character per cell, so boards up to 9x9 only")
    questions, answers, ratings, lines = [], [], [], []
    for line, question, answer, row in puzzle_rows(p, geo.cells):
        rating = 0
        if row.get("rating") is not None:
            try:
                rating = int(float(row["rating"]))
            except ValueError:
                raise DataError(f"{p}:{line}: rating {row['rating']!r} is not a number") from None
        if rating < min_difficulty:
            continue
        questions.append(question)
        answers.append(answer)
        ratings.append(rating)
        lines.append(line)
    if not questions:
        raise DataError(f"task sudoku: {p} has no rows (with rating >= {min_difficulty})")
    q = _DIGIT[np.frombuffer("".join(questions).encode(), dtype=np.uint8)].reshape(-1, geo.cells)
    a = _DIGIT[np.frombuffer("".join(answers).encode(), dtype=np.uint8)].reshape(-1, geo.cells)
    problems = [
        ((q > geo.n).any(1), f"question has a character other than '.', '0' or 1..{geo.n}"),
        (((a < 1) | (a > geo.n)).any(1), f"answer must be digits 1..{geo.n} only"),
        (((q != 0) & (q != a)).any(1), "answer disagrees with a given of the question"),
        (~valid_grids(a.astype(np.int64), geo), "answer breaks a row, column or box constraint"),
    ]
    raise_first(p, lines, problems)
    rank = np.full(q.shape, -2, dtype=np.int16)  # -2: solve order not computed yet (lazily)
    return {"question": q, "solution": a, "difficulty": np.array(ratings, dtype=np.int32), "rank": rank}


def valid_grids(digits: np.ndarray, geo: Geometry) -> np.ndarray:
    """digits (K, n*n) -> (K,) bool: every row, column and box holds 1..n once."""
    units = np.sort(digits[:, geo.unit_index], axis=-1)  # (K, 3n, n)
    return (units == np.arange(1, geo.n + 1)).all(axis=(1, 2))
