"""Task `maze` and evaluator `maze`.

Mazes come from the seeded generator of maze_puzzles.py (tree mazes with some loops, S and G at
least `min_path_length` moves apart; with `unique_path`, the default, only mazes with one
shortest path, so exact match is well defined) or from the Maze-Hard CSV layout
(docs/reference.md#maze-hard-builder).

Encoding as the reference: the characters "# SGo" are tokens 1..5 (wall, open, start, goal,
path), V = 6, L = rows * cols, every cell supervised, puzzle id 0. The label is the question
with the shortest path's open cells marked 'o' (S and G keep their tokens).

Splits "train", "test" and "valid". The validation split is generated from its own seed with
none of its mazes in train or test; with imported data it is the `valid_fraction` of csv_train
held out of training (without it, asking for "valid" is an error). Never augmented.

The evaluator counts a prediction as a valid path when it changes only open cells, marks them
'o' or leaves them open, and the 'o' cells join S to G in exactly the shortest distance: any
shortest path is accepted, a longer one is not. Exact accuracy compares with the label.
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
from dis_core.contract.metrics import Tally
from dis_core.contract.reveal import ranked_reveal
from dis_core.contract.validators import in_range, positive
from dis_plugins.tasks.bank_cache import cached_bank, held_out, memoised_split, no_valid_split, questions_digest, split_seed
from dis_plugins.tasks.maze_puzzles import CHARSET, GOAL, OPEN, PATH, START, WALL, generate_bank, read_csv

log = structlog.get_logger()
_CACHE_VERSION = 1


# ---- batched distances on the torch side (evaluator, trajectories) --------------------------


def distance_maps(passable: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """passable, source (B, R, C) bool -> (B, R, C) int64 moves from the source cells through
    passable cells (breadth-first, by repeated 4-neighbour dilation); -1 where unreachable."""
    reach = source & passable
    dist = torch.where(reach, 0, -1).long()
    step = 0
    while True:
        step += 1
        grown = reach.clone()
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown[:, :, 1:] |= reach[:, :, :-1]
        grown[:, :, :-1] |= reach[:, :, 1:]
        grown &= passable
        new = grown & ~reach
        if not new.any():
            return dist
        dist[new] = step
        reach = grown


def _dihedral_sources(rows: int, cols: int) -> np.ndarray:
    """(T, L) source cell of every cell under each shape-preserving dihedral transform
    (8 for square grids: the reference's order; 4 otherwise), identity first."""
    idx = np.arange(rows * cols).reshape(rows, cols)
    maps = [idx, np.rot90(idx, 1), np.rot90(idx, 2), np.rot90(idx, 3), np.fliplr(idx), np.flipud(idx), idx.T,
            np.fliplr(np.rot90(idx, 1))]
    return np.stack([m.reshape(-1) for m in maps if m.shape == (rows, cols)])


# ---- task -----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class MazeConfig:
    rows: int = 30
    cols: int = 30
    num_train: int = attrs.field(default=1000, validator=positive)  # Maze-Hard has 1000 train and 1000 test mazes
    num_test: int = attrs.field(default=1000, validator=positive)
    # The validation split (`eval.split = "valid"`, `dis study`): generated from its own seed, none
    # of its mazes in train or test, never augmented. None = num_test mazes.
    num_valid: int | None = attrs.field(default=None, validator=positive)
    min_path_length: int = 110  # shortest S->G distance in moves; long paths make mazes hard
    loop_fraction: float = 0.05  # share of the tree maze's inner walls removed, making alternative routes
    unique_path: bool = True  # keep only mazes with one shortest path, so exact match is fair
    augment: bool = False  # train: all dihedral variants (8 square, 4 otherwise); reference default off
    csv_train: Path | None = None  # Maze-Hard CSV to import instead of generating (relative to the recipe)
    csv_test: Path | None = None
    # With csv_train: the share of its mazes held out of training as the validation split. 0 =
    # none (the CSV has no validation split; asking for one is an error). Generated data: unused.
    valid_fraction: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0, high_open=True))
    seed: int = 0  # data seed, apart from the run seed
    cache: bool = True  # keep generated sets under data_dir/maze, keyed by this config


class MazeDataset:
    def __init__(self, bank: dict, sources: np.ndarray):
        self.bank, self.sources = bank, sources  # sources (T, L): identity only when not augmented

    def __len__(self) -> int:
        return len(self.bank["question"]) * len(self.sources)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        base, t = np.divmod(indices, len(self.sources))
        src = self.sources[t]  # (K, L)
        return {
            "inputs": np.take_along_axis(self.bank["question"][base], src, 1).astype(np.int64),
            "labels": np.take_along_axis(self.bank["label"][base], src, 1).astype(np.int64),
            "puzzle_ids": np.zeros(len(indices), dtype=np.int64),
            "example_ids": indices,
        }


class MazeTask:
    name = "maze"

    def __init__(self, config: MazeConfig, data_dir: Path):
        if config.rows < 3 or config.cols < 3:
            raise UserError(f"task maze: rows and cols must be at least 3 (got {config.rows}x{config.cols})")
        if not 0.0 <= config.loop_fraction <= 1.0:
            raise UserError(f"task maze: loop_fraction must be in [0, 1] (got {config.loop_fraction})")
        if config.valid_fraction and not config.csv_train:
            raise UserError("task maze: valid_fraction holds out imported training mazes (csv_train); generated "
                            "data has a validation bank of its own (num_valid)")
        self.config, self.data_dir = config, Path(data_dir)
        self._imported: dict | None = None
        self.spec = TaskSpec(vocab_size=len(CHARSET) + 1, seq_len=config.rows * config.cols, num_puzzle_ids=1,
                             pad_id=0, grid_shape=(config.rows, config.cols))
        self._banks: dict[str, dict] = {}
        self._datasets: dict[str, MazeDataset] = {}

    def bank(self, split: str) -> dict:
        return memoised_split(self._banks, "maze", split, self._load)

    def _load(self, split: str) -> dict:
        c = self.config
        if c.csv_train and split != "test":
            if self._imported is None:
                self._imported = read_csv(c.csv_train, c.rows, c.cols, "csv_train")
            bank = self._imported
            if not c.valid_fraction:
                if split == "valid":
                    raise no_valid_split("maze")
                return bank
            valid = held_out(len(bank["question"]), c.valid_fraction, c.seed, "maze")
            return {k: v[valid if split == "valid" else ~valid] for k, v in bank.items()}
        if split == "test" and c.csv_test:
            return read_csv(c.csv_test, c.rows, c.cols, "csv_test")
        if split == "valid":
            # Its own seed, and none of its mazes in train or test (built first: validation is
            # built only when asked for, and never changes them).
            count = c.num_valid or c.num_test
            seen = (self.bank("train"), self.bank("test"))
            exclude = {bytes(q) for bank in seen for q in bank["question"]}
            key = [_CACHE_VERSION, split, c.rows, c.cols, count, c.seed, c.min_path_length, c.loop_fraction,
                   c.unique_path, questions_digest(*seen)]
        else:
            count = c.num_train if split == "train" else c.num_test
            exclude = set()
            if split == "test" and not c.csv_train:
                exclude = {bytes(q) for q in self.bank("train")["question"]}
            key = [_CACHE_VERSION, split, c.rows, c.cols, count, c.seed, c.min_path_length, c.loop_fraction, c.unique_path]
            if exclude:
                key.append(c.num_train)

        def make() -> dict:
            bank, rate = generate_bank(c.rows, c.cols, count, split_seed(c.seed, split), c.min_path_length,
                                       c.loop_fraction, c.unique_path, exclude)
            n = bank["length"]
            log.info("generated mazes", split=split, count=count, per_second=round(rate, 1),
                     path_mean=float(n.mean()), path_min=int(n.min()), path_max=int(n.max()))
            return bank

        return cached_bank(self.data_dir, "maze", split, f"{c.rows}x{c.cols}", key, make, enabled=c.cache)

    def dataset(self, split: str) -> MazeDataset:
        if split not in self._datasets:
            sources = _dihedral_sources(self.config.rows, self.config.cols)
            if split != "train" or not self.config.augment:
                sources = sources[:1]
            self._datasets[split] = MazeDataset(self.bank(split), sources)
        return self._datasets[split]

    def solver_trajectory(self, batch, n_sup: int) -> torch.Tensor:
        """(B, n_sup, L): the labelled path grows from S, a floor(s * cells / n_sup) prefix per frame."""
        inputs, labels = batch["inputs"], batch["labels"]
        grid = (-1, *self.spec.grid_shape)
        on_path = (labels == PATH) | (labels == START) | (labels == GOAL)
        dist = distance_maps(on_path.reshape(grid), (labels == START).reshape(grid))  # (B, R, C)
        return ranked_reveal(inputs, labels, dist.reshape(labels.shape), n_sup)


    # ---- using a trained model (optional Task methods: dis predict, trajectory pictures) ----

    def encode_inputs(self, puzzles: list) -> dict[str, np.ndarray]:
        """Mazes -> {"inputs": (K, rows*cols)}: a string of rows*cols characters over "# SG"
        (wall, open, start, goal; the Maze-Hard CSV's question column) or a list of rows strings.
        Any other character is an error naming its row and column."""
        r, c = self.config.rows, self.config.cols
        out = np.empty((len(puzzles), r * c), dtype=np.int64)
        for i, p in enumerate(puzzles):
            out[i] = [CHARSET.index(ch) + 1 for ch in _maze_text(p, r, c, f"puzzle {i}")]
        return {"inputs": out}

    def check_answers(self, inputs: np.ndarray, answers: np.ndarray) -> np.ndarray:
        """(K,) bool: the 'o' cells mark a shortest S->G path and nothing else changed."""
        return valid_paths(torch.as_tensor(inputs), torch.as_tensor(answers), self.spec.grid_shape).numpy()

    def decode(self, tokens: np.ndarray, puzzle=None):
        """Tokens -> the puzzle's form (a string, or a list of row strings) with the path as 'o';
        '?' for a token outside "# SGo"."""
        chars = "".join(CHARSET[t - 1] if 1 <= t <= len(CHARSET) else "?" for t in np.asarray(tokens).tolist())
        if isinstance(puzzle, list):
            c = self.config.cols
            return [chars[i: i + c] for i in range(0, len(chars), c)]
        return chars

    def render_grid(self, tokens: np.ndarray, question: np.ndarray | None = None):
        """Walls dark, open cells white, the path blue, S green, G red, other tokens magenta."""
        palette = np.array([[255, 0, 200], [43, 43, 43], [255, 255, 255], [46, 204, 64], [255, 65, 54], [31, 119, 230]], dtype=np.uint8)
        t = np.asarray(tokens, dtype=np.int64)
        return palette[np.where((t >= 1) & (t <= len(CHARSET)), t, 0)].reshape(self.config.rows, self.config.cols, 3)


def _maze_text(p, rows: int, cols: int, where: str) -> str:
    """One maze as JSON gives it -> its rows*cols characters; DataError naming the cell."""
    shape = f"a {rows}x{cols} maze is a string of {rows * cols} characters or a list of {rows} strings of {cols}"
    if isinstance(p, list):
        if len(p) != rows or not all(isinstance(row, str) for row in p):
            raise DataError(f"{where}: {shape}")
        for k, row in enumerate(p):
            if len(row) != cols:
                raise DataError(f"{where}: row {k} has {len(row)} characters; {shape}")
        p = "".join(p)
    if not isinstance(p, str) or len(p) != rows * cols:
        raise DataError(f"{where}: {shape}" + (f", not {len(p)}" if isinstance(p, str) else ""))
    for k, ch in enumerate(p):
        if ch not in "# SG":
            raise DataError(f"{where}: row {k // cols} column {k % cols}: {ch!r} is not a maze cell; each is '#' "
                            f"wall, ' ' open, 'S' start or 'G' goal; rows and columns count from 0")
    if p.count("S") != 1 or p.count("G") != 1:
        raise DataError(f"{where}: a maze needs exactly one 'S' and one 'G' (it has {p.count('S')} and {p.count('G')})")
    return p


def build_maze(config: MazeConfig, ctx) -> MazeTask:
    """Generated hard mazes with a shortest-path label, or the Maze-Hard CSV layout."""
    return MazeTask(config, ctx.data_dir)


# ---- evaluator ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class MazeEvalConfig:
    """No options: scores the prediction after the last supervision step."""


def valid_paths(inputs: torch.Tensor, preds: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor:
    """inputs, preds (B, L) tokens -> (B,) bool: preds marks a shortest S->G path and changes
    nothing else."""
    grid = (-1, *grid_shape)
    is_open = inputs == OPEN
    unchanged = torch.where(is_open, (preds == OPEN) | (preds == PATH), preds == inputs).all(1)
    start, goal = (inputs == START).reshape(grid), (inputs == GOAL).reshape(grid)
    shortest = (distance_maps((inputs != WALL).reshape(grid), start) * goal).sum((1, 2))  # (B,)
    marked = preds == PATH
    route = marked.reshape(grid) | start | goal
    via_marks = (distance_maps(route, start) * goal).sum((1, 2))  # -1 when the marks do not reach G
    return unchanged & (shortest > 0) & (via_marks == shortest) & (marked.sum(1) == shortest - 1)


class MazeEvaluator:
    headline = "valid_path_rate"  # any shortest path counts; equals exact match when paths are unique

    def __init__(self, grid_shape: tuple[int, int]):
        self.grid_shape = grid_shape
        self.reset()

    def reset(self) -> None:
        self.tally = Tally("count", "valid", "exact")

    def update(self, record: EvalRecord) -> None:
        pred = record.preds[:, -1].cpu().long()
        inputs, labels = record.batch["inputs"].cpu(), record.batch["labels"].cpu()
        supervised = labels != IGNORE
        self.tally.add(count=len(pred), valid=valid_paths(inputs, pred, self.grid_shape).sum(),
                       exact=((pred == labels) | ~supervised).all(1).sum())

    def state(self) -> dict:
        return self.tally.state()

    def compute(self, states: list[dict], out_dir: Path | None) -> dict[str, float]:
        t = Tally.merged(states)
        return {
            "valid_path_rate": t.ratio("valid", "count"),
            "exact_accuracy": t.ratio("exact", "count"),
            "count": float(t["count"]),
        }


def build_maze_evaluator(config: MazeEvalConfig, ctx) -> MazeEvaluator:
    """Valid shortest-path rate and exact accuracy for mazes."""
    if ctx.spec.grid_shape is None:
        ctx.fail("evaluator maze needs a task with a grid_shape", error=CapabilityError)
    return MazeEvaluator(tuple(ctx.spec.grid_shape))


@hookimpl
def register_tasks(register):
    register("maze", MazeConfig, build_maze)


@hookimpl
def register_evaluators(register):
    register("maze", MazeEvalConfig, build_maze_evaluator)
