"""Task `sudoku` and evaluator `sudoku`.

Puzzles come from a seeded generator (or the Sudoku-Extreme CSV layout, reference §5.4):
a bitmask constraint-propagation solver (naked and hidden singles, then guessing on the cell
with fewest candidates) fills a random grid and removes clues in random order while the
solution stays unique, giving minimal puzzles. A puzzle's *difficulty* is the number of dead
ends (guesses that propagation refutes) in the complete search that proves uniqueness: 0 means
singles alone solve it. `min_difficulty` keeps only harder ones, by rejection.

Encoding as the reference: token = digit + 1 (blank 1, digits 2..n+1), V = n + 2, L = n * n,
every cell supervised, puzzle id 0. Train examples are `num_augmentations + 1` variants of each
puzzle (variant 0 unchanged), each a pure function of its index.
"""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import attrs
import numpy as np
import structlog
import torch

from dis_core import hookimpl
from dis_core.errors import DataError, UserError
from dis_core.interfaces import IGNORE, EvalRecord, TaskSpec
from dis_core.logs import progress
from dis_plugins.tasks.bank_cache import cached_bank, memoised_split, split_seed, utf8_text
from dis_plugins.solver_edits import ranked_reveal

log = structlog.get_logger()
_CACHE_VERSION = 1  # bump when generation changes, so stale caches are not reused


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


def _rank_of(order: list[int], cells: int) -> np.ndarray:
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
            rows.append((q, s, difficulty, _rank_of(order, geo.cells)))
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
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"task sudoku: {key} {p} is a directory, not a CSV file")
    if not p.is_file():
        raise DataError(f"task sudoku: {key} file {p} not found")
    if geo.n > 9:
        raise UserError(f"task sudoku: {key} holds one character per cell, so boards up to 9x9 only")
    questions, answers, ratings, lines = [], [], [], []
    with p.open(newline="", encoding="utf-8") as f, utf8_text(p):
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if "question" not in header or "answer" not in header:
            raise DataError(f"{p}:1: header must name the columns source,question,answer,rating (got {header})")
        iq, ia = header.index("question"), header.index("answer")
        ir = header.index("rating") if "rating" in header else None
        for row in reader:
            where = f"{p}:{reader.line_num}"
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
            for name, text in (("question", row[iq]), ("answer", row[ia])):
                if len(text) != geo.cells or not text.isascii():
                    raise DataError(f"{where}: {name} must be {geo.cells} ASCII characters, got {len(text)}")
            rating = 0
            if ir is not None:
                try:
                    rating = int(float(row[ir]))
                except ValueError:
                    raise DataError(f"{where}: rating {row[ir]!r} is not a number") from None
            if rating < min_difficulty:
                continue
            questions.append(row[iq])
            answers.append(row[ia])
            ratings.append(rating)
            lines.append(reader.line_num)
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
    for bad, what in problems:
        if bad.any():
            raise DataError(f"{p}:{lines[int(np.argmax(bad))]}: {what}")
    rank = np.full(q.shape, -2, dtype=np.int16)  # -2: solve order not computed yet (lazily)
    return {"question": q, "solution": a, "difficulty": np.array(ratings, dtype=np.int32), "rank": rank}


def valid_grids(digits: np.ndarray, geo: Geometry) -> np.ndarray:
    """digits (K, n*n) -> (K,) bool: every row, column and box holds 1..n once."""
    units = np.sort(digits[:, geo.unit_index], axis=-1)  # (K, 3n, n)
    return (units == np.arange(1, geo.n + 1)).all(axis=(1, 2))


# ---- augmentation: counter-based randomness, so get() is a pure function of the index -------


def _uniform(seed: int, index: np.ndarray, stream: int, m: int) -> np.ndarray:
    """(K, m) floats in [0, 1) from a splitmix64 hash of (seed, example index, stream, j)."""
    with np.errstate(over="ignore"):
        x = index.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
        x = x + np.uint64((seed * 1_000_003 + stream) & 0xFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)
        x = x + np.arange(m, dtype=np.uint64)[None, :] * np.uint64(0x8CB92BA72F3D8DD7)
        for mul in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB):
            x = (x ^ (x >> np.uint64(31))) * np.uint64(mul)
        x ^= x >> np.uint64(29)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def augmentation(geo: Geometry, seed: int, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's Sudoku augmentation for each index -> (source cell of every cell
    (K, n*n), digit map (K, n+1) with blank fixed). Transposing needs square boxes."""
    K, n, br, bc = len(index), geo.n, geo.box_rows, geo.box_cols

    def line_map(stream: int, group: int) -> np.ndarray:  # groups of `group` lines, shuffled
        groups = n // group
        order = np.argsort(_uniform(seed, index, stream, groups), axis=1)  # (K, groups)
        within = np.argsort(_uniform(seed, index, stream + 1, n).reshape(K, groups, group), axis=2)
        return (order[:, :, None] * group + within).reshape(K, n)

    rows, cols = line_map(2, br), line_map(4, bc)  # (K, n) each
    src = rows[:, :, None] * n + cols[:, None, :]  # (K, n, n)
    if br == bc:
        flip = _uniform(seed, index, 1, 1)[:, 0] < 0.5
        src[flip] = src[flip].transpose(0, 2, 1)
    digit_map = np.zeros((K, n + 1), dtype=np.int64)
    digit_map[:, 1:] = np.argsort(_uniform(seed, index, 0, n), axis=1) + 1
    return src.reshape(K, n * n), digit_map


# ---- task -----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SudokuConfig:
    size: int = 0  # board side; 0 = box_rows * box_cols if given, else 9. Boxes are implied
    # from the size (4 -> 2x2, 6 -> 2x3, 9 -> 3x3) unless box_rows and box_cols are both set.
    box_rows: int = 0
    box_cols: int = 0
    num_train: int = attrs.field(default=1000, validator=attrs.validators.ge(1))  # generated puzzles per split, before augmentation
    num_test: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    min_difficulty: int = 0  # generated: dead ends of the full search; CSV: the rating column
    num_augmentations: int = 1000  # train variants per puzzle (the reference's 1000-puzzle build)
    csv_train: str = ""  # Sudoku-Extreme CSV to import instead of generating ("" = generate)
    csv_test: str = ""
    subsample_size: int = 0  # train CSV rows kept (random, without replacement); 0 = all
    seed: int = 0  # data seed, apart from the run seed so every run sees the same puzzles
    cache: bool = True  # keep generated sets under data_dir/sudoku, keyed by this config


class SudokuDataset:
    def __init__(self, geo: Geometry, bank: dict, num_augmentations: int, seed: int, with_rank: bool):
        self.geo, self.bank, self.variants, self.seed = geo, bank, num_augmentations + 1, seed
        # Solve orders feed solver_edits targets, which only training uses; the test split skips
        # them, so a large imported test set is never solved cell by cell.
        self.with_rank = with_rank

    def __len__(self) -> int:
        return len(self.bank["question"]) * self.variants

    def _ranks(self, base: np.ndarray) -> np.ndarray:
        rank = self.bank["rank"]
        for b in np.unique(base[rank[base, 0] == -2]):  # imported puzzles: solve on first use
            order = solve(self.geo, self.bank["question"][b].tolist(), limit=1, with_order=True)[2] or []
            rank[b] = _rank_of(order, self.geo.cells)
        return rank[base]

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        base = indices // self.variants
        q = self.bank["question"][base].astype(np.int64)  # (K, L) digits, 0 blank
        s = self.bank["solution"][base].astype(np.int64)
        arrays = [(q, True), (s, True)]
        if self.with_rank:
            r = self._ranks(base).astype(np.int64)
            arrays.append((r, False))
        moved = indices % self.variants > 0
        if moved.any():
            src, digit_map = augmentation(self.geo, self.seed, indices[moved])
            for arr, relabel in arrays:
                out = np.take_along_axis(arr[moved], src, axis=1)
                arr[moved] = np.take_along_axis(digit_map, out, axis=1) if relabel else out
        batch = {
            "inputs": q + 1,
            "labels": s + 1,
            "puzzle_ids": np.zeros(len(indices), dtype=np.int64),
            "example_ids": indices,
        }
        if self.with_rank:
            batch["solve_rank"] = r  # (K, L) order in which the solver fixes each cell, -1 for givens
        return batch


class SudokuTask:
    name = "sudoku"

    def __init__(self, config: SudokuConfig, data_dir: Path):
        self.config, self.data_dir = config, Path(data_dir)
        size = config.size or (config.box_rows * config.box_cols) or 9
        if config.box_rows or config.box_cols:
            if config.box_rows * config.box_cols != size:
                raise UserError(f"task sudoku: box_rows {config.box_rows} x box_cols {config.box_cols} != size {size}")
            self.geo = Geometry(config.box_rows, config.box_cols)
        else:
            self.geo = Geometry.from_size(size)
        if min(self.geo.box_rows, self.geo.box_cols) < 2:
            raise UserError(f"task sudoku: size {size} has no boxes of at least 2x2 (use 4, 6, 8, 9, ...)")
        n = self.geo.n
        self.spec = TaskSpec(vocab_size=n + 2, seq_len=n * n, num_puzzle_ids=1, pad_id=0, grid_shape=(n, n))
        self._banks: dict[str, dict] = {}
        self._datasets: dict[str, SudokuDataset] = {}

    def bank(self, split: str) -> dict:
        return memoised_split(self._banks, "sudoku", split, self._load)

    def _load(self, split: str) -> dict:
        c = self.config
        path = c.csv_train if split == "train" else c.csv_test
        if path:
            bank = read_csv(path, self.geo, c.min_difficulty, f"csv_{split}")
            if split == "train" and 0 < c.subsample_size < len(bank["question"]):
                keep = np.sort(np.random.default_rng(c.seed).choice(len(bank["question"]), c.subsample_size, replace=False))
                bank = {k: v[keep] for k, v in bank.items()}
            return bank
        count = c.num_train if split == "train" else c.num_test
        # Test puzzles must not repeat train ones (it matters on 4x4 boards).
        exclude = set()
        if split == "test" and not c.csv_train:
            exclude = {bytes(row) for row in self.bank("train")["question"]}
        key = [_CACHE_VERSION, split, self.geo.box_rows, self.geo.box_cols, count, c.seed, c.min_difficulty]
        if exclude:
            key.append(c.num_train)

        def make() -> dict:
            bank, rate = generate_bank(self.geo, count, split_seed(c.seed, split), c.min_difficulty, exclude)
            d = bank["difficulty"]
            log.info("generated sudoku puzzles", split=split, count=count, per_second=round(rate, 1),
                     clues_mean=float((bank["question"] > 0).sum(1).mean()), difficulty_mean=float(d.mean()),
                     difficulty_max=int(d.max()))
            return bank

        return cached_bank(self.data_dir, "sudoku", split, f"{self.geo.n}x{self.geo.n}", key, make, enabled=c.cache)

    def dataset(self, split: str) -> SudokuDataset:
        if split not in self._datasets:
            variants = self.config.num_augmentations if split == "train" else 0
            self._datasets[split] = SudokuDataset(self.geo, self.bank(split), variants, self.config.seed, split == "train")
        return self._datasets[split]

    def solver_trajectory(self, batch, n_sup: int) -> torch.Tensor:
        """(B, n_sup, L): the missing cells revealed in the order the solver fixes them."""
        inputs, labels = batch["inputs"], batch["labels"]
        rank = batch.get("solve_rank")
        if rank is None:  # a batch not made by this task's datasets: solve it here
            rows = []
            for q in (inputs.cpu().numpy() - 1).clip(0):
                order = solve(self.geo, q.tolist(), limit=1, with_order=True)[2] or []
                rows.append(_rank_of(order, self.geo.cells))
            rank = torch.from_numpy(np.array(rows, dtype=np.int64)).to(inputs.device)
        return ranked_reveal(inputs, labels, rank.to(inputs.device), n_sup)


def build_sudoku(config: SudokuConfig, ctx) -> SudokuTask:
    """Generated hard Sudoku (any box shape) or the Sudoku-Extreme CSV layout."""
    return SudokuTask(config, ctx.data_dir)


# ---- evaluator ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SudokuEvalConfig:
    """No options: scores the prediction after the last supervision step."""


class SudokuEvaluator:
    headline = "valid_solution_rate"

    def __init__(self, geo: Geometry):
        self.geo = geo
        self.reset()

    def reset(self) -> None:
        self._state = {"count": 0, "valid": 0, "exact": 0, "cells": 0, "cells_right": 0}

    def update(self, record: EvalRecord) -> None:
        pred = record.preds[:, -1].cpu().long()  # (B, L)
        inputs, labels = record.batch["inputs"].cpu(), record.batch["labels"].cpu()
        digits = (pred - 1).numpy()
        in_range = ((digits >= 1) & (digits <= self.geo.n)).all(1)
        keeps_givens = ((pred == inputs) | (inputs == 1)).all(1).numpy()
        valid = in_range & keeps_givens & valid_grids(np.clip(digits, 0, self.geo.n), self.geo)
        supervised = labels != IGNORE
        right = (pred == labels) & supervised
        st = self._state
        st["count"] += len(pred)
        st["valid"] += int(valid.sum())
        st["exact"] += int((right | ~supervised).all(1).sum())
        st["cells"] += int(supervised.sum())
        st["cells_right"] += int(right.sum())

    def state(self) -> dict:
        return dict(self._state)

    def compute(self, states: list[dict], out_dir: Path | None) -> dict[str, float]:
        total = {k: sum(s[k] for s in states) for k in self._state}
        count = max(total["count"], 1)
        return {
            "valid_solution_rate": total["valid"] / count,
            "exact_accuracy": total["exact"] / count,
            "cell_accuracy": total["cells_right"] / max(total["cells"], 1),
            "count": float(total["count"]),
        }


def build_sudoku_evaluator(config: SudokuEvalConfig, ctx) -> SudokuEvaluator:
    """Valid-solution rate (constraints and givens) and exact accuracy for Sudoku."""
    geo = getattr(ctx.task, "geo", None)
    if not isinstance(geo, Geometry):
        if ctx.spec is None or ctx.spec.grid_shape is None:
            raise UserError("evaluator sudoku needs a task with a square grid_shape")
        geo = Geometry.from_size(ctx.spec.grid_shape[0])
    return SudokuEvaluator(geo)


@hookimpl
def register_tasks(register):
    register("sudoku", SudokuConfig, build_sudoku)


@hookimpl
def register_evaluators(register):
    register("sudoku", SudokuEvalConfig, build_sudoku_evaluator)
