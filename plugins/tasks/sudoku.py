"""Task `sudoku` and evaluator `sudoku`.

Puzzles come from the seeded generator of sudoku_puzzles.py (minimal puzzles with a unique
solution; `min_difficulty` keeps only those whose uniqueness proof meets that many dead ends,
by rejection) or from the Sudoku-Extreme CSV layout (docs/reference.md#sudoku-extreme-builder).

Encoding as the reference: token = digit + 1 (blank 1, digits 2..n+1), V = n + 2, L = n * n,
every cell supervised, puzzle id 0. Train examples are `num_augmentations + 1` variants of each
puzzle (variant 0 unchanged), each a pure function of its index.

Splits "train", "test" and "valid". The validation split is generated from its own seed with
none of its puzzles in train or test; with imported data it is the `valid_fraction` of csv_train
held out of training (without it, asking for "valid" is an error). Never augmented.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import structlog
import torch

from dis_core import hookimpl
from dis_core.contract.errors import CapabilityError, DataError, UserError
from dis_core.contract.interfaces import IGNORE, EvalRecord, TaskSpec
from dis_core.contract.metrics import Tally, final_and_ran
from dis_core.contract.reveal import ranked_reveal
from dis_core.contract.validators import in_range, positive
from dis_plugins.tasks.bank_cache import cached_bank, held_out, memoised_split, no_valid_split, questions_digest, split_seed
from dis_plugins.tasks.sudoku_puzzles import Geometry, generate_bank, rank_of, read_csv, solve, valid_grids

log = structlog.get_logger()
_CACHE_VERSION = 1  # bump when generation changes, so stale caches are not reused


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
    num_train: int = attrs.field(default=1000, validator=positive)  # generated puzzles per split, before augmentation
    num_test: int = attrs.field(default=1000, validator=positive)
    # The validation split (`eval.split = "valid"`, `dis study`): generated from its own seed, none
    # of its puzzles in train or test, never augmented. None = num_test puzzles.
    num_valid: int | None = attrs.field(default=None, validator=positive)
    min_difficulty: int = 0  # generated: dead ends of the full search; CSV: the rating column
    num_augmentations: int = 1000  # train variants per puzzle (the reference's 1000-puzzle build)
    csv_train: Path | None = None  # Sudoku-Extreme CSV to import instead of generating (relative to the recipe)
    csv_test: Path | None = None
    subsample_size: int = 0  # train CSV rows kept (random, without replacement); 0 = all
    # With csv_train: the share of its puzzles held out of training as the validation split. 0 =
    # none (the CSV has no validation split; asking for one is an error). Generated data: unused.
    valid_fraction: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0, high_open=True))
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
            rank[b] = rank_of(order, self.geo.cells)
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
        if config.valid_fraction and not config.csv_train:
            raise UserError("task sudoku: valid_fraction holds out imported training puzzles (csv_train); generated "
                            "data has a validation bank of its own (num_valid)")
        self._banks: dict[str, dict] = {}
        self._datasets: dict[str, SudokuDataset] = {}
        self._imported: dict | None = None

    def bank(self, split: str) -> dict:
        return memoised_split(self._banks, "sudoku", split, self._load)

    def _csv_train(self) -> dict:
        """csv_train as imported (and subsampled), before any puzzle is held out for validation."""
        if self._imported is None:
            c = self.config
            bank = read_csv(c.csv_train, self.geo, c.min_difficulty, "csv_train")
            if 0 < c.subsample_size < len(bank["question"]):
                keep = np.sort(np.random.default_rng(c.seed).choice(len(bank["question"]), c.subsample_size, replace=False))
                bank = {k: v[keep] for k, v in bank.items()}
            self._imported = bank
        return self._imported

    def _load(self, split: str) -> dict:
        c = self.config
        if c.csv_train and split != "test":
            bank = self._csv_train()
            if not c.valid_fraction:
                if split == "valid":
                    raise no_valid_split("sudoku")
                return bank
            valid = held_out(len(bank["question"]), c.valid_fraction, c.seed, "sudoku")
            return {k: v[valid if split == "valid" else ~valid] for k, v in bank.items()}
        if split == "test" and c.csv_test:
            return read_csv(c.csv_test, self.geo, c.min_difficulty, "csv_test")
        if split == "valid":
            # Its own seed, and none of its puzzles in train or test (built first: validation is
            # built only when asked for, and never changes them).
            count = c.num_valid or c.num_test
            seen = (self.bank("train"), self.bank("test"))
            exclude = {bytes(row) for bank in seen for row in bank["question"]}
            key = [_CACHE_VERSION, split, self.geo.box_rows, self.geo.box_cols, count, c.seed, c.min_difficulty,
                   questions_digest(*seen)]
        else:
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
                rows.append(rank_of(order, self.geo.cells))
            rank = torch.from_numpy(np.array(rows, dtype=np.int64)).to(inputs.device)
        return ranked_reveal(inputs, labels, rank.to(inputs.device), n_sup)


    # ---- using a trained model (optional Task methods: dis predict, trajectory pictures) ----

    def encode_inputs(self, puzzles: list) -> dict[str, np.ndarray]:
        """Puzzles -> {"inputs": (K, n*n)}: a string of n*n characters ('.' or '0' blank,
        digits 1..n; boards up to 9x9), as in the Sudoku-Extreme CSV, or n rows of n ints (0
        blank). Any other cell is an error naming its row and column."""
        n = self.geo.n
        out = np.empty((len(puzzles), n * n), dtype=np.int64)
        for i, p in enumerate(puzzles):
            out[i] = np.asarray(_digits(p, n, f"puzzle {i}"), dtype=np.int64) + 1
        return {"inputs": out}

    def decode(self, tokens: np.ndarray, puzzle=None):
        """Tokens -> the puzzle's form: a string ('.' blank, '?' a token that is no digit) or rows of
        ints (0 blank, -1 no digit)."""
        n = self.geo.n
        digits = np.asarray(tokens, dtype=np.int64) - 1
        digits = np.where((digits >= 0) & (digits <= n), digits, -1)
        if isinstance(puzzle, list) or n > 9:
            return digits.reshape(n, n).tolist()
        return "".join("?" if d < 0 else "." if d == 0 else str(d) for d in digits.tolist())

    def check_answers(self, inputs: np.ndarray, answers: np.ndarray) -> np.ndarray:
        """(K,) bool: a completed grid (digits only) breaking no row, column or box, givens kept."""
        return valid_solutions(np.asarray(answers), np.asarray(inputs), self.geo)

    def check_givens(self, inputs: np.ndarray) -> np.ndarray:
        """(K,) bool: no digit given twice in a row, column or box."""
        digits = np.asarray(inputs, dtype=np.int64) - 1  # 0 blank
        units = np.sort(digits[:, self.geo.unit_index], axis=-1)  # (K, 3n, n)
        repeated = (units[..., 1:] == units[..., :-1]) & (units[..., 1:] > 0)
        return ~repeated.any(axis=(1, 2))

    def render_grid(self, tokens: np.ndarray, question: np.ndarray | None = None) -> dict:
        """Digits on white, boxes outlined: givens black, filled-in digits blue, a digit repeated
        in its row, column or box red; a token that is no digit '?' on red."""
        n = self.geo.n
        digits = np.asarray(tokens, dtype=np.int64) - 1
        bad = (digits < 0) | (digits > n)
        rgb = np.full((n * n, 3), 255, dtype=np.uint8)
        rgb[bad] = (240, 150, 150)
        units = self.geo.unit_index  # (3n, n) cells of each row, column and box
        vals = np.where(bad, 0, digits)[units]  # (3n, n)
        dup = np.zeros(n * n, dtype=bool)
        for u, v in zip(units, vals):
            seen, counts = np.unique(v[v > 0], return_counts=True)
            dup[u] |= np.isin(v, seen[counts > 1])
        given = (np.asarray(question, dtype=np.int64) - 1 > 0) if question is not None else np.zeros(n * n, bool)
        text = np.array(["?" if b else "" if d == 0 else str(d) for d, b in zip(digits.tolist(), bad.tolist())], dtype=object)
        colour = np.tile(np.array([[25, 90, 200]], dtype=np.uint8), (n * n, 1))
        colour[given] = (0, 0, 0)
        colour[dup & ~given] = (215, 0, 0)
        return {"rgb": rgb.reshape(n, n, 3), "text": text.reshape(n, n), "text_rgb": colour.reshape(n, n, 3),
                "boxes": (self.geo.box_rows, self.geo.box_cols)}


def _digits(p, n: int, where: str) -> list[int]:
    """One puzzle as JSON gives it -> its n*n digits (0 blank); DataError naming the cell."""
    if isinstance(p, str):
        if n > 9:
            raise DataError(f"{where}: a {n}x{n} Sudoku is written as {n} rows of ints (strings hold digits up to 9)")
        if len(p) != n * n:
            raise DataError(f"{where}: a {n}x{n} Sudoku string has {n * n} characters, not {len(p)}")
        allowed = ".0" + "123456789"[:n]
        for k, ch in enumerate(p):
            if ch not in allowed:
                raise DataError(f"{where}: row {k // n} column {k % n}: {ch!r} is not a cell; each is '.' or '0' "
                                f"(blank) or a digit 1..{n}; rows and columns count from 0")
        return [0 if ch == "." else int(ch) for ch in p]
    if not (isinstance(p, list) and len(p) == n and all(isinstance(r, list) and len(r) == n for r in p)):
        raise DataError(f"{where}: a {n}x{n} Sudoku is a string of {n * n} characters or {n} rows of {n} ints")
    for r, row in enumerate(p):
        for c, v in enumerate(row):
            if type(v) is not int or not 0 <= v <= n:  # exact type: true, 1.0 or "1" is a mistake
                raise DataError(f"{where}: row {r} column {c}: {v!r} is not a cell; each is an int 0 (blank) "
                                f"to {n}; rows and columns count from 0")
    return [v for row in p for v in row]


def valid_solutions(answers: np.ndarray, inputs: np.ndarray, geo: Geometry) -> np.ndarray:
    """answers, inputs (K, n*n) tokens -> (K,) bool: digits only, no row, column or box
    breaking the rules, every given of `inputs` kept."""
    digits = answers.astype(np.int64) - 1
    in_range = ((digits >= 1) & (digits <= geo.n)).all(1)
    keeps_givens = ((answers == inputs) | (inputs == 1)).all(1)
    return in_range & keeps_givens & valid_grids(np.clip(digits, 0, geo.n), geo)


def build_sudoku(config: SudokuConfig, ctx) -> SudokuTask:
    """Generated hard Sudoku (any box shape) or the Sudoku-Extreme CSV layout."""
    return SudokuTask(config, ctx.data_dir)


# ---- evaluator ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SudokuEvalConfig:
    """No options: scores the prediction after the last supervision step."""


class SudokuEvaluator:
    """`valid_solution_rate`: the final grid holds digits only, keeps the givens and breaks no
    row, column or box; `exact_accuracy` matches y*; `valid@s` is the valid rate after step s
    (over the examples that ran step s), which the adaptive-steps benchmark reads as "stop every
    example after s steps"."""

    headline = "valid_solution_rate"

    def __init__(self, geo: Geometry):
        self.geo = geo
        self.reset()

    def reset(self) -> None:
        self.tally = Tally("count", "valid", "exact", "cells", "cells_right")

    def _valid(self, pred: torch.Tensor, inputs: torch.Tensor) -> np.ndarray:
        """(B, L) predictions and questions -> (B,) bool valid solutions."""
        return valid_solutions(pred.numpy(), inputs.numpy(), self.geo)

    def update(self, record: EvalRecord) -> None:
        preds = record.preds.cpu().long()  # (B, N, L); a halted example repeats its answer
        inputs, labels = record.batch["inputs"].cpu(), record.batch["labels"].cpu()
        b, n_steps, length = preds.shape
        pred = preds[:, -1]
        valid = self._valid(pred, inputs)
        _, ran = final_and_ran(record)
        each = self._valid(preds.reshape(b * n_steps, length), inputs.repeat_interleave(n_steps, 0)).reshape(b, n_steps)
        supervised = labels != IGNORE
        right = (pred == labels) & supervised
        self.tally.add(count=len(pred), valid=valid.sum(), exact=(right | ~supervised).all(1).sum(),
                       cells=supervised.sum(), cells_right=right.sum(),
                       valid_sum=(torch.from_numpy(each) & ran).sum(0), valid_count=ran.sum(0))

    def state(self) -> dict:
        return self.tally.state()

    def compute(self, states: list[dict], out_dir: Path | None) -> dict[str, float]:
        t = Tally.merged(states)
        return {
            "valid_solution_rate": t.ratio("valid", "count"),
            "exact_accuracy": t.ratio("exact", "count"),
            "cell_accuracy": t.ratio("cells_right", "cells"),
            "count": float(t["count"]),
            **t.per_step("valid", "valid_sum", "valid_count"),
        }


def build_sudoku_evaluator(config: SudokuEvalConfig, ctx) -> SudokuEvaluator:
    """Valid-solution rate (constraints and givens) and exact accuracy for Sudoku."""
    geo = getattr(ctx.task, "geo", None)
    if not isinstance(geo, Geometry):
        if ctx.spec.grid_shape is None:
            ctx.fail("evaluator sudoku needs a task with a square grid_shape", error=CapabilityError)
        geo = Geometry.from_size(ctx.spec.grid_shape[0])
    return SudokuEvaluator(geo)


@hookimpl
def register_tasks(register):
    register("sudoku", SudokuConfig, build_sudoku)


@hookimpl
def register_evaluators(register):
    register("sudoku", SudokuEvalConfig, build_sudoku_evaluator)
