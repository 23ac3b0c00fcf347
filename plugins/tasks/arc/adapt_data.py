"""The `arc_adapt` task: new ARC tasks for `dis adapt` (dis_core/tools/adapt.py).

A model trained on ARC has one puzzle-embedding row per (task, variant) it trained on. Tasks it
never saw get new rows here: their identifiers start at `first_id`, the size of the trained
model's table, so the old rows keep their meaning and the table simply grows. The train split is
the new tasks' demonstration pairs only, with their augmentation variants; the test split is
their test inputs under every variant, for the `arc` evaluator's vote and submission.json.

TASKS may be a Kaggle `*_challenges.json` (test outputs absent; a `_solutions.json` beside it,
or named with `solutions`, makes the run scored), a folder of task JSON files (searched
recursively), or one task JSON file. A test pair without a known output is never scored and its
labels are all IGNORE, so nothing of it could reach a loss.

Leakage guard. The train split decodes every index to (task, pair) before rendering and refuses
(`LeakageError`) any pair that is a test pair of an adapted task, by position (pair index past
the demonstrations) and by content (the same input and output grids as a known test pair). The
guard runs on every batch the trainer draws, so a later change to the split rule that let a test
output in would stop the run instead of silently training on the answer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import attrs
import numpy as np

from dis_core.contract.errors import DataError, UserError
from dis_core.contract.interfaces import IGNORE, TaskSpec
from dis_core.contract.validators import non_negative, positive

from .canvas import check_canvas, largest_side
from .dataset import Corpus, TestSplit, TrainSplit
from .encoding import VOCAB_SIZE
from .sources import BUILTIN, Puzzle, _pairs, load_subset, parse_grid
from .task import ArcTask


class LeakageError(DataError):
    """A training batch would hold a test pair (its output) of a task being adapted."""


@attrs.frozen(kw_only=True)
class ArcAdaptConfig:
    """New ARC tasks to adapt a trained model to (written by `dis adapt`, rarely by hand)."""

    tasks: Path  # a Kaggle *_challenges.json, a folder of task JSON files, or one task JSON file
    solutions: Path | None = None  # test outputs, Kaggle layout; default: <prefix>_solutions.json beside the challenges
    first_id: int = attrs.field(validator=positive)  # identifier of the first new row: the trained table's size
    num_augmentations: int = attrs.field(default=8, validator=non_negative)  # variants per task besides the original
    eval_variants: int | None = attrs.field(default=None, validator=positive)  # variants voted per test pair; None = all
    translate: bool = True  # random placement on the canvas in training, as the arc task does
    seed: int = 42
    max_tasks: int | None = attrs.field(default=None, validator=positive)  # the first K tasks by id
    canvas: int = 30  # the trained model's canvas side (`dis adapt` copies the run's); every grid must fit


def pair_key(i: np.ndarray, o: np.ndarray | None) -> bytes:
    """Content key of a pair (or of an input alone): shapes and cells."""
    parts = [bytes(i.shape), i.tobytes()]
    if o is not None:
        parts += [bytes(o.shape), o.tobytes()]
    return hashlib.sha256(b"|".join(parts)).digest()


# ------------------------------------------------------------------ reading TASKS


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def _task(task_id: str, obj, source: str, answers: list | None) -> tuple[Puzzle, tuple[bool, ...]]:
    """A Puzzle whose unknown test outputs are a 1x1 placeholder, and which test outputs are known."""
    where = f"{source}: task {task_id}"
    if not isinstance(obj, dict) or not isinstance(obj.get("train"), list) or not isinstance(obj.get("test"), list):
        raise DataError(f"{where}: a task needs `train` and `test` lists")
    train = _pairs(obj["train"], where, "train")
    if not train:
        raise DataError(f"{where}: no demonstration (train) pairs to adapt on")
    if not obj["test"]:
        raise DataError(f"{where}: no test inputs")
    if answers is not None and (not isinstance(answers, list) or len(answers) != len(obj["test"])):
        raise DataError(f"{where}: the solutions give {len(answers) if isinstance(answers, list) else 'no list of'} "
                        f"output(s) for {len(obj['test'])} test input(s)")
    test, known = [], []
    for k, pair in enumerate(obj["test"]):
        at = f"{where}: test pair {k}"
        if not isinstance(pair, dict) or "input" not in pair:
            raise DataError(f"{at}: missing `input`")
        out = answers[k] if answers is not None else pair.get("output")
        test.append((parse_grid(pair["input"], f"{at} input"),
                     parse_grid(out, f"{at} output") if out is not None else np.zeros((1, 1), np.uint8)))
        known.append(out is not None)
    return Puzzle(task_id, "adapt", source, train, tuple(test)), tuple(known)


def read_tasks(tasks: Path, solutions: Path | None = None, limit: int | None = None):
    """(puzzles sorted by id, known-output flags per test pair) of TASKS; see the module doc."""
    path = Path(tasks).expanduser()
    items: list[tuple[str, object, str]] = []
    if path.is_dir():
        files = sorted(path.rglob("*.json"), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"{path}: no .json task files in this folder")
        items = [(f.stem, _read(f), str(f)) for f in files]
    elif path.is_file() and path.name.endswith("_challenges.json"):
        data = _read(path)
        if not isinstance(data, dict) or not data:
            raise DataError(f"{path}: expected an object mapping task ids to tasks")
        items = [(tid, data[tid], str(path)) for tid in sorted(data)]
        beside = path.with_name(path.name.replace("_challenges.json", "_solutions.json"))
        if solutions is None and beside.is_file():
            solutions = beside
    elif path.is_file() and path.suffix == ".json":
        items = [(path.stem, _read(path), str(path))]
    else:
        raise UserError(f"{path}: TASKS must be a Kaggle *_challenges.json, a folder of task .json files or one task "
                        f".json file" + ("" if path.exists() else " (no such file or folder)"))
    answers = None
    if solutions is not None:
        answers = _read(Path(solutions))
        if not isinstance(answers, dict):
            raise DataError(f"{solutions}: expected an object mapping task ids to lists of output grids")
    seen: dict[str, str] = {}
    puzzles, known = [], []
    for tid, obj, source in items[:limit] if limit else items:
        if tid in seen:
            raise DataError(f"{source}: task {tid} is also in {seen[tid]}; list each task once")
        seen[tid] = source
        p, k = _task(tid, obj, source, answers.get(tid) if answers is not None else None)
        puzzles.append(p)
        known.append(k)
    return puzzles, known


# ------------------------------------------------------------------ the task


class AdaptTrainSplit:
    """The demonstration pairs of the new tasks, every variant, behind the leakage guard."""

    def __init__(self, corpus: Corpus, translate: bool, first_id: int, test_keys: dict[bytes, str]):
        self.inner = TrainSplit(corpus, strict_split=False, translate=translate)  # test-subset groups: demos only
        self.corpus, self.first_id, self.test_keys = corpus, first_id, test_keys
        pairs = corpus.pair_offset[-1]
        self._keys = [pair_key(corpus.grids[k, 0, :corpus.shapes[k, 0, 0], :corpus.shapes[k, 0, 1]],
                               corpus.grids[k, 1, :corpus.shapes[k, 1, 0], :corpus.shapes[k, 1, 1]]) for k in range(pairs)]

    def __len__(self) -> int:
        return len(self.inner)

    def groups(self):
        return self.inner.groups()

    def guard(self, puz: np.ndarray, pair_local: np.ndarray) -> None:
        """Refuse any test pair of an adapted task: by position, then by content."""
        c = self.corpus
        past = pair_local >= c.n_train[puz]
        if past.any():
            j = int(np.argmax(past))
            raise LeakageError(f"leakage guard: a training batch would hold test pair {int(pair_local[j] - c.n_train[puz[j]])} "
                               f"of task {c.puzzles[puz[j]].task_id} (adaptation trains on demonstration pairs only)")
        for p, e in zip(puz.tolist(), pair_local.tolist()):
            hit = self.test_keys.get(self._keys[int(c.pair_offset[p]) + e])
            if hit is not None:
                raise LeakageError(f"leakage guard: demonstration pair {e} of task {c.puzzles[p].task_id} is the same "
                                   f"input and output as {hit}; training on it would train on that answer")

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        puz, _var, e, _n = self.inner.decode(indices)
        self.guard(np.atleast_1d(puz), np.atleast_1d(e))
        batch = self.inner.get(indices)
        batch["puzzle_ids"] = batch["puzzle_ids"] - 1 + self.first_id
        return batch


class AdaptTestSplit:
    """Every variant of every test input; labels IGNORE where the output is not known."""

    def __init__(self, corpus: Corpus, eval_variants: int | None, first_id: int, known: list[tuple[bool, ...]]):
        self.inner = TestSplit(corpus, eval_variants)
        self.first_id = first_id
        self.known = known

    def __len__(self) -> int:
        return len(self.inner)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        batch = self.inner.get(indices)
        batch["puzzle_ids"] = batch["puzzle_ids"] - 1 + self.first_id
        unknown = np.array([not self.known[t][p] for t, p in zip(batch["arc_task"].tolist(), batch["arc_pair"].tolist())], dtype=bool)
        batch["labels"][unknown] = IGNORE
        return batch


class ArcAdaptTask(ArcTask):
    """New ARC tasks on identifiers `first_id`.. (an ArcTask for encoding, decoding and pictures)."""

    def __init__(self, config: ArcAdaptConfig):
        self.config, self._splits, self._reference = config, {}, None
        puzzles, self.known = read_tasks(config.tasks, config.solutions, config.max_tasks)
        check_canvas(config.canvas)
        for p in puzzles:  # a new task is never dropped or cropped: the model cannot take it, say so
            if largest_side(p) > config.canvas:
                raise UserError(f"task {p.task_id!r} ({config.tasks}): a grid of side {largest_side(p)} does not fit "
                                f"the trained model's {config.canvas}x{config.canvas} canvas (task.config.canvas)")
        self.side, self.valid_puzzles = config.canvas, []
        self.corpus = Corpus(puzzles, [True] * len(puzzles), config.num_augmentations, config.seed, config.canvas)
        self.first_id = config.first_id
        self.test_puzzles = [(p.task_id, len(p.test)) for p in puzzles]
        self.test_keys = {pair_key(i, o): f"test pair {k} of task {p.task_id}"
                          for p, kn in zip(puzzles, self.known) for k, (i, o) in enumerate(p.test) if kn[k]}
        num_ids = config.first_id + self.corpus.num_ids - 1  # the corpus's blank row 0 is the model's own row 0
        self.spec = TaskSpec(vocab_size=VOCAB_SIZE, seq_len=self.side * self.side, num_puzzle_ids=num_ids, pad_id=0,
                             grid_shape=(self.side, self.side))

    @property
    def scored(self) -> bool:
        """Whether every test output is known (pass@K then means something)."""
        return all(all(k) for k in self.known)

    def new_rows(self) -> range:
        return range(self.first_id, self.spec.num_puzzle_ids)

    def row_tasks(self) -> list[str]:
        """The task id of each new row, in row order."""
        return [p.task_id for p, n in zip(self.corpus.puzzles, self.corpus.n_var) for _ in range(int(n))]

    def dataset(self, split: str):
        if split not in ("train", "test"):
            raise UserError(f"the arc_adapt task has splits 'train' and 'test', not {split!r}")
        if split not in self._splits:
            c = self.config
            self._splits[split] = (AdaptTrainSplit(self.corpus, c.translate, self.first_id, self.test_keys) if split == "train"
                                   else AdaptTestSplit(self.corpus, c.eval_variants, self.first_id, self.known))
        return self._splits[split]

    def encode_inputs(self, puzzles: list) -> dict[str, np.ndarray]:
        out = super().encode_inputs(puzzles)
        ids = out["puzzle_ids"]
        out["puzzle_ids"] = np.where(ids > 0, ids - 1 + self.first_id, 0)
        return out

    # ---- what the base model saw (dis adapt's leakage report) ----

    def seen_by_base(self, base_task: str, base_config: dict) -> dict:
        """Whether a model trained with task `base_task` configured by `base_config` (its recipe's
        table) saw these tasks: by task id, and by content (demonstration pairs, test inputs and
        test pairs among the pairs it trained on). Its demonstrations in training are fine (the
        official recipe does it); a test pair (input and output) in training is a leak."""
        if base_task != "arc":
            return {"checked": False, "why": f"the base task {base_task!r} is not arc"}
        if base_config.get("reference_dir"):
            return {"checked": False, "why": "the base trained on a reference data directory, not on sources dis can read"}
        limit = base_config.get("max_train_puzzles_per_subset")
        trained: list[Puzzle] = []
        whole = [p for s in dict.fromkeys(base_config.get("train_subsets", ())) for p in load_subset(s, limit)]
        trained += whole
        demos_only = []
        test_subset = base_config.get("test_subset")
        if test_subset and not base_config.get("strict_split", False):
            demos_only = load_subset(test_subset, base_config.get("max_test_puzzles"))
        pairs = {pair_key(i, o) for p in whole for i, o in (*p.train, *p.test)}
        pairs |= {pair_key(i, o) for p in demos_only for i, o in p.train}
        inputs = {pair_key(i, None) for p in whole for i, _ in (*p.train, *p.test)} | {pair_key(i, None) for p in demos_only for i, _ in p.train}
        ids = {p.task_id: "whole" for p in whole} | {p.task_id: "demonstrations" for p in demos_only}
        rows = {}
        for p, kn in zip(self.corpus.puzzles, self.known):
            rows[p.task_id] = {
                "id_trained": ids.get(p.task_id),  # None, "whole" or "demonstrations"
                "demos_seen": sum(pair_key(i, o) in pairs for i, o in p.train),
                "test_inputs_seen": sum(pair_key(i, None) in inputs for i, _ in p.test),
                "test_pairs_seen": sum(kn[k] and pair_key(i, o) in pairs for k, (i, o) in enumerate(p.test)),
            }
        return {
            "checked": True,
            "base_subsets": [*dict.fromkeys(base_config.get("train_subsets", ())), *([f"{test_subset} (demonstrations)"] if demos_only else [])],
            "tasks_with_id_trained": sorted(t for t, r in rows.items() if r["id_trained"]),
            "tasks_with_demos_seen": sorted(t for t, r in rows.items() if r["demos_seen"]),
            "tasks_with_test_pair_seen": sorted(t for t, r in rows.items() if r["test_pairs_seen"]),
            "per_task": rows,
        }


def build_arc_adapt_task(config: ArcAdaptConfig, ctx) -> ArcAdaptTask:
    """New ARC tasks for `dis adapt`: demonstration pairs to train on, new puzzle ids from first_id."""
    return ArcAdaptTask(config)


__all__ = ["ArcAdaptConfig", "ArcAdaptTask", "LeakageError", "build_arc_adapt_task", "read_tasks", "BUILTIN"]
