"""Task `maze` and evaluator `maze`.

Mazes come from a seeded generator (or the Maze-Hard CSV layout, reference §5.4). The
generator carves a spanning-tree maze with a randomised depth-first walk (long winding
corridors) on the cells of one parity, knocks down `loop_fraction` of the remaining inner walls
so there are alternative routes, and places S and G at least `min_path_length` moves apart.
With `unique_path` (default) only mazes whose shortest path is unique are kept, so exact match
is well defined; otherwise the label is a canonical shortest path (lowest cell index first).

Encoding as the reference: the characters "# SGo" are tokens 1..5 (wall, open, start, goal,
path), V = 6, L = rows * cols, every cell supervised, puzzle id 0. The label is the question
with the shortest path's open cells marked 'o' (S and G keep their tokens).

The evaluator counts a prediction as a valid path when it changes only open cells, marks them
'o' or leaves them open, and the 'o' cells join S to G in exactly the shortest distance: any
shortest path is accepted, a longer one is not. Exact accuracy compares with the label.
"""

from __future__ import annotations

import csv
import random
import time
from collections import deque
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
CHARSET = "# SGo"
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5  # token = position in CHARSET + 1
_CACHE_VERSION = 1


# ---- generation -----------------------------------------------------------------------------


def _neighbours(rows: int, cols: int) -> list[tuple[int, ...]]:
    out = []
    for r in range(rows):
        for c in range(cols):
            out.append(tuple(
                (r + dr) * cols + c + dc
                for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                if 0 <= r + dr < rows and 0 <= c + dc < cols
            ))
    return out


def _carve(rows: int, cols: int, rng: random.Random, loop_fraction: float) -> bytearray:
    """Open cells (1) of a spanning-tree maze plus loops. Cells sit on rows/cols of one parity;
    on even sides the parity is random so the all-wall border line moves from side to side."""
    r0 = rng.randrange(2) if rows % 2 == 0 else 0
    c0 = rng.randrange(2) if cols % 2 == 0 else 0
    h, w = (rows - r0 + 1) // 2, (cols - c0 + 1) // 2
    is_open, seen = bytearray(rows * cols), bytearray(h * w)

    def at(cell: int) -> int:
        return (r0 + 2 * (cell // w)) * cols + c0 + 2 * (cell % w)

    first = rng.randrange(h * w)
    seen[first], is_open[at(first)] = 1, 1
    stack = [first]
    while stack:
        cell = stack[-1]
        i, j = divmod(cell, w)
        options = [n for n, ok in ((cell - w, i > 0), (cell + w, i < h - 1), (cell - 1, j > 0), (cell + 1, j < w - 1))
                   if ok and not seen[n]]
        if not options:
            stack.pop()
            continue
        nxt = options[rng.randrange(len(options))]
        seen[nxt] = 1
        a, b = at(cell), at(nxt)
        is_open[(a + b) // 2] = is_open[b] = 1  # the wall between them, and the new cell
        stack.append(nxt)
    for cell in range(h * w):
        i, j = divmod(cell, w)
        for nxt, ok in ((cell + w, i < h - 1), (cell + 1, j < w - 1)):
            mid = (at(cell) + at(nxt)) // 2
            if ok and not is_open[mid] and rng.random() < loop_fraction:
                is_open[mid] = 1
    return is_open


def _bfs(is_open, neighbours, source: int) -> list[int]:
    dist = [-1] * len(is_open)
    dist[source] = 0
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in neighbours[u]:
            if is_open[v] and dist[v] < 0:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def make_maze(rows, cols, rng, neighbours, min_path_length, loop_fraction, unique_path):
    """-> (question tokens, label tokens, shortest path length in moves)."""
    while True:
        is_open = _carve(rows, cols, rng, loop_fraction)
        cells = [i for i, o in enumerate(is_open) if o]
        for _ in range(4):  # a few S/G draws per carved maze before carving another
            s = rng.choice(cells)
            from_s = _bfs(is_open, neighbours, s)
            far = [i for i in cells if from_s[i] >= max(min_path_length, 1)]
            if not far:
                continue
            g = rng.choice(far)
            from_g, length = _bfs(is_open, neighbours, g), from_s[g]
            if not unique_path or sum(1 for i in cells if from_s[i] + from_g[i] == length) == length + 1:
                break
        else:
            continue
        question = np.where(np.frombuffer(bytes(is_open), dtype=np.uint8) > 0, OPEN, WALL).astype(np.uint8)
        question[s], question[g] = START, GOAL
        label = question.copy()
        u = g
        for k in range(length - 1, 0, -1):  # walk back, lowest-index step first (canonical)
            u = min(v for v in neighbours[u] if from_s[v] == k)
            label[u] = PATH
        return question, label, length


def generate_bank(rows, cols, count, seed, min_path_length, loop_fraction, unique_path, exclude):
    rng, neighbours = random.Random(seed), _neighbours(rows, cols)
    questions, labels, lengths, seen = [], [], [], set(exclude)
    started = time.time()
    bar = progress(count, f"mazes {rows}x{cols}", unit="maze")
    while len(questions) < count:
        q, a, n = make_maze(rows, cols, rng, neighbours, min_path_length, loop_fraction, unique_path)
        if bytes(q) not in seen:
            seen.add(bytes(q))
            questions.append(q)
            labels.append(a)
            lengths.append(n)
            bar.update(1)
    bar.close()
    rate = count / max(time.time() - started, 1e-9)
    bank = {"question": np.array(questions, dtype=np.uint8).reshape(count, rows * cols),
            "label": np.array(labels, dtype=np.uint8).reshape(count, rows * cols),
            "length": np.array(lengths, dtype=np.int32)}
    return bank, rate


# ---- the Maze-Hard CSV layout ---------------------------------------------------------------

_TOKEN = np.zeros(256, dtype=np.uint8)  # char code -> token, 0 = not in the charset
for _i, _ch in enumerate(CHARSET):
    _TOKEN[ord(_ch)] = _i + 1


def read_csv(path: str, rows: int, cols: int, key: str) -> dict:
    """`source,question,answer,rating` rows of rows*cols characters over "# SGo"."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"task maze: {key} {p} is a directory, not a CSV file")
    if not p.is_file():
        raise DataError(f"task maze: {key} file {p} not found")
    L, questions, answers, lines = rows * cols, [], [], []
    with p.open(newline="", encoding="utf-8") as f, utf8_text(p):
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if "question" not in header or "answer" not in header:
            raise DataError(f"{p}:1: header must name the columns source,question,answer,rating (got {header})")
        iq, ia = header.index("question"), header.index("answer")
        for row in reader:
            where = f"{p}:{reader.line_num}"
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
            for name, text in (("question", row[iq]), ("answer", row[ia])):
                if len(text) != L or not text.isascii():
                    raise DataError(f"{where}: {name} must be {L} ASCII characters ({rows}x{cols}), got {len(text)}")
            questions.append(row[iq])
            answers.append(row[ia])
            lines.append(reader.line_num)
    if not questions:
        raise DataError(f"task maze: {p} has no rows")
    q = _TOKEN[np.frombuffer("".join(questions).encode(), dtype=np.uint8)].reshape(-1, L)
    a = _TOKEN[np.frombuffer("".join(answers).encode(), dtype=np.uint8)].reshape(-1, L)
    ends = (q == START) | (q == GOAL)
    a = np.where(ends, q, a)  # S and G stay themselves in labels, whether or not the file marks them 'o'
    problems = [
        (((q == 0) | (q == PATH)).any(1), "question has a character outside '# SG'"),
        (((q == START).sum(1) != 1) | ((q == GOAL).sum(1) != 1), "question needs exactly one S and one G"),
        ((a == 0).any(1), "answer has a character outside '# SGo'"),
        (((a != q) & ~((q == OPEN) & (a == PATH))).any(1), "answer changes a cell other than marking open cells 'o'"),
    ]
    for bad, what in problems:
        if bad.any():
            raise DataError(f"{p}:{lines[int(np.argmax(bad))]}: {what}")
    return {"question": q, "label": a, "length": (a == PATH).sum(1).astype(np.int32) + 1}


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
    num_train: int = attrs.field(default=1000, validator=attrs.validators.ge(1))  # Maze-Hard has 1000 train and 1000 test mazes
    num_test: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    min_path_length: int = 110  # shortest S->G distance in moves; long paths make mazes hard
    loop_fraction: float = 0.05  # share of the tree maze's inner walls removed, making alternative routes
    unique_path: bool = True  # keep only mazes with one shortest path, so exact match is fair
    augment: bool = False  # train: all dihedral variants (8 square, 4 otherwise); reference default off
    csv_train: str = ""  # Maze-Hard CSV to import instead of generating ("" = generate)
    csv_test: str = ""
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
        self.config, self.data_dir = config, Path(data_dir)
        self.spec = TaskSpec(vocab_size=len(CHARSET) + 1, seq_len=config.rows * config.cols, num_puzzle_ids=1,
                             pad_id=0, grid_shape=(config.rows, config.cols))
        self._banks: dict[str, dict] = {}
        self._datasets: dict[str, MazeDataset] = {}

    def bank(self, split: str) -> dict:
        return memoised_split(self._banks, "maze", split, self._load)

    def _load(self, split: str) -> dict:
        c = self.config
        path = c.csv_train if split == "train" else c.csv_test
        if path:
            return read_csv(path, c.rows, c.cols, f"csv_{split}")
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
        self._state = {"count": 0, "valid": 0, "exact": 0}

    def update(self, record: EvalRecord) -> None:
        pred = record.preds[:, -1].cpu().long()
        inputs, labels = record.batch["inputs"].cpu(), record.batch["labels"].cpu()
        supervised = labels != IGNORE
        self._state["count"] += len(pred)
        self._state["valid"] += int(valid_paths(inputs, pred, self.grid_shape).sum())
        self._state["exact"] += int(((pred == labels) | ~supervised).all(1).sum())

    def state(self) -> dict:
        return dict(self._state)

    def compute(self, states: list[dict], out_dir: Path | None) -> dict[str, float]:
        total = {k: sum(s[k] for s in states) for k in self._state}
        count = max(total["count"], 1)
        return {
            "valid_path_rate": total["valid"] / count,
            "exact_accuracy": total["exact"] / count,
            "count": float(total["count"]),
        }


def build_maze_evaluator(config: MazeEvalConfig, ctx) -> MazeEvaluator:
    """Valid shortest-path rate and exact accuracy for mazes."""
    if ctx.spec is None or ctx.spec.grid_shape is None:
        raise UserError("evaluator maze needs a task with a grid_shape")
    return MazeEvaluator(tuple(ctx.spec.grid_shape))


@hookimpl
def register_tasks(register):
    register("maze", MazeConfig, build_maze)


@hookimpl
def register_evaluators(register):
    register("maze", MazeEvalConfig, build_maze_evaluator)
