"""The ARC corpus (grids + variant table) and its two splits, augmented on the fly.

Nothing is materialised: a split's `get(indices)` decodes each index into (puzzle, variant,
pair), then renders the canvases in one vectorised gather (encoding.render). What is stored is
the original grids on 30x30 blocks (~8 MB for ARC-1 + ConceptARC) and 11 bytes per variant.

Train split. Group g is one original puzzle's train-side pairs: all pairs of a training-subset
task, the demonstration pairs of a test-subset task (none with `strict_split`). An index is
(round, g, e) with e < E_g; round r shows variant (r + rot_g) mod V_g, so one pass over the
split (rounds = the largest V_g) shows every example of every variant of a full group once,
which is exactly the reference's materialised data, and every group keeps the same weight per
example whatever its variant count, as in the reference sampler (one random variant per group
per epoch). Translations are a pure function of (seed, task, variant, example), fixed per
augmented example like the reference's build-time draw, and one random example per variant
stays at (0, 0). `groups()` declares each (group, variant) a puzzle, so the default group
sampler (dis_core.step.data.GroupStream) trains in the reference's order: per pass one random variant
of every group, its examples together.

Test split. Every variant of every test pair of the test-subset tasks, untranslated, in the
order group -> variant -> pair; batches carry `arc_task`/`arc_pair`/`aug_*` for voting.
"""

from __future__ import annotations

import sys
import zlib

import numpy as np
from tqdm import tqdm

from dis_core.contract.interfaces import IGNORE, PuzzleGroups

from .augment import generate_variants, hash_uniform
from .encoding import PAD, SIDE, render, transformed_shape
from .sources import Puzzle

_SALT_ROTATION, _SALT_KEEP, _SALT_ROW, _SALT_COL = 11, 12, 13, 14


def task_key(task_id: str) -> int:
    """A stable integer per task, so a task's variants and translations do not depend on which
    other tasks are loaded (shrinking a recipe keeps the data of the tasks it keeps)."""
    return zlib.crc32(task_id.encode("utf-8"))


def make_batch(indices, inputs, outputs, puzzle_ids, tids, cmaps, arc_task, arc_pair) -> dict[str, np.ndarray]:
    labels = outputs.astype(np.int64)
    labels[outputs == PAD] = IGNORE  # PAD is the reference's ignore_label_id; EOS stays supervised
    k = len(indices)
    return {
        "inputs": inputs,
        "labels": labels,
        "puzzle_ids": np.asarray(puzzle_ids, dtype=np.int64),
        "example_ids": np.asarray(indices, dtype=np.int64),
        "aug_tid": np.asarray(tids, dtype=np.int64),  # dihedral transform applied (encoding.INVERSE undoes it)
        "aug_colors": np.asarray(cmaps, dtype=np.int64).reshape(k, 10),  # augmented colour = aug_colors[original colour]
        "arc_task": np.broadcast_to(np.asarray(arc_task, dtype=np.int64), (k,)).copy(),  # test puzzle index, -1 in train
        "arc_pair": np.broadcast_to(np.asarray(arc_pair, dtype=np.int64), (k,)).copy(),  # test pair index, -1 in train
    }


def variant_groups(example_offset: np.ndarray, n_var: np.ndarray) -> PuzzleGroups:
    """The puzzles of a round-indexed train split (index = (round, g, e)): group g's puzzles are
    its example runs in rounds 0..V_g-1, which show each of its V_g variants exactly once
    (round r shows variant (r + rot_g) mod V_g); later rounds repeat them and are left out."""
    group_offsets = np.concatenate([[0], np.cumsum(n_var)]).astype(np.int64)
    g = np.repeat(np.arange(len(n_var)), n_var)  # (P,) group of each puzzle
    rnd = np.arange(group_offsets[-1]) - group_offsets[g]
    start = rnd * example_offset[-1] + example_offset[g]
    return PuzzleGroups(puzzle_start=start, puzzle_size=np.diff(example_offset)[g], group_offsets=group_offsets)


class Corpus:
    """Every pair of every puzzle on 30x30 blocks, and each puzzle's deduplicated variants."""

    def __init__(self, puzzles: list[Puzzle], is_test: list[bool], num_aug: int, seed: int, canvas: int = SIDE):
        self.puzzles, self.seed = puzzles, seed
        self.side = canvas  # the canvas side (task.config.canvas): grids are stored on side x side blocks
        self.is_test = np.asarray(is_test, dtype=bool)
        self.n_train = np.array([len(p.train) for p in puzzles], dtype=np.int64)
        self.n_test = np.array([len(p.test) for p in puzzles], dtype=np.int64)
        self.pair_offset = np.concatenate([[0], np.cumsum(self.n_train + self.n_test)])
        n_pairs = int(self.pair_offset[-1])
        self.grids = np.zeros((n_pairs, 2, canvas, canvas), dtype=np.uint8)  # [pair, input/output]
        self.shapes = np.zeros((n_pairs, 2, 2), dtype=np.int64)
        k = 0
        for p in puzzles:
            for pair in (*p.train, *p.test):
                for side, g in enumerate(pair):
                    self.grids[k, side, : g.shape[0], : g.shape[1]] = g
                    self.shapes[k, side] = g.shape
                k += 1
        self.keys = np.array([task_key(p.task_id) for p in puzzles], dtype=np.int64)
        tids, maps = [], []
        bar = tqdm(puzzles, desc="ARC variants", unit="task", disable=not sys.stderr.isatty() or num_aug < 50, leave=False)
        for p, key in zip(bar, self.keys):
            t, m = generate_variants(p.grids(), num_aug, np.random.default_rng([seed, int(key)]))
            tids.append(t)
            maps.append(m)
        self.n_var = np.array([len(t) for t in tids], dtype=np.int64)
        self.var_offset = np.concatenate([[0], np.cumsum(self.n_var)])
        self.var_tid = np.concatenate(tids) if tids else np.zeros(0, np.uint8)
        self.var_map = np.concatenate(maps) if maps else np.zeros((0, 10), np.uint8)

    @property
    def num_ids(self) -> int:
        return 1 + int(self.var_offset[-1])  # identifier 0 is the blank

    def name(self, puzzle: int, variant: int) -> str:
        """The reference's identifier name: `<task>` or `<task>|||t<tid>|||<colour map>`."""
        task = self.puzzles[puzzle].task_id
        if variant == 0:
            return task
        row = self.var_offset[puzzle] + variant
        return f"{task}|||t{int(self.var_tid[row])}|||{''.join(str(int(c)) for c in self.var_map[row])}"

    def render(self, puz, var, pair_local, n_ex, translate: bool):
        """(inputs, outputs) (K, 900) uint8, puzzle ids, tids, colour maps for (puzzle, variant,
        pair-within-puzzle) triples; `n_ex` is the size of the example list the pair belongs to
        (its train-side pairs), used to pick the one untranslated example per variant."""
        row = self.var_offset[puz] + var
        pair = self.pair_offset[puz] + pair_local
        tid, cmap = self.var_tid[row], self.var_map[row]
        shapes = self.shapes[pair]  # (K, 2 sides, 2)
        r0 = np.zeros(len(pair), dtype=np.int64)
        c0 = np.zeros(len(pair), dtype=np.int64)
        if translate:
            h2, w2 = transformed_shape(shapes[..., 0], shapes[..., 1], tid[:, None].astype(np.int64))
            key = self.keys[puz]
            keep = pair_local == hash_uniform(n_ex, self.seed, key, var, _SALT_KEEP)
            r0 = np.where(keep, 0, hash_uniform(self.side + 1 - h2.max(axis=1), self.seed, key, var, pair_local, _SALT_ROW))
            c0 = np.where(keep, 0, hash_uniform(self.side + 1 - w2.max(axis=1), self.seed, key, var, pair_local, _SALT_COL))
        inputs = render(self.grids[pair, 0], shapes[:, 0], tid, cmap, r0, c0)
        outputs = render(self.grids[pair, 1], shapes[:, 1], tid, cmap, r0, c0)
        return inputs, outputs, 1 + row, tid, cmap


class TrainSplit:
    def __init__(self, corpus: Corpus, strict_split: bool, translate: bool):
        self.corpus, self.translate = corpus, translate
        n_ex = np.where(corpus.is_test, 0 if strict_split else corpus.n_train, corpus.n_train + corpus.n_test)
        self.group_puzzle = np.flatnonzero(n_ex > 0)
        self.group_size = n_ex[self.group_puzzle]  # E_g
        self.example_offset = np.concatenate([[0], np.cumsum(self.group_size)])
        self.n_var = n_var = corpus.n_var[self.group_puzzle]
        self.rounds = int(n_var.max()) if len(n_var) else 0
        self.rotation = hash_uniform(n_var, corpus.seed, corpus.keys[self.group_puzzle], _SALT_ROTATION) if len(n_var) else n_var

    def __len__(self) -> int:
        return self.rounds * int(self.example_offset[-1])

    def groups(self) -> PuzzleGroups:
        return variant_groups(self.example_offset, self.n_var)

    def decode(self, indices: np.ndarray):
        """index -> (puzzle, variant, example within the group, group size)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"ARC train split has {len(self)} examples, got index {idx.min() if idx.min() < 0 else idx.max()}")
        rnd, k = np.divmod(idx, self.example_offset[-1])
        g = np.searchsorted(self.example_offset, k, side="right") - 1
        puz = self.group_puzzle[g]
        var = (rnd + self.rotation[g]) % self.corpus.n_var[puz]
        return puz, var, k - self.example_offset[g], self.group_size[g]

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        puz, var, e, n_ex = self.decode(indices)
        inputs, outputs, ids, tid, cmap = self.corpus.render(puz, var, e, n_ex, self.translate)
        return make_batch(indices, inputs, outputs, ids, tid, cmap, -1, -1)


class TestSplit:
    def __init__(self, corpus: Corpus, max_variants: int | None, puzzles=None, task_offset: int = 0):
        self.corpus = corpus
        # arc_task = task_offset + position in this array; `puzzles` (corpus indices) picks the
        # held-out tasks of this split when the corpus holds two sets of them (valid_subset)
        self.group_puzzle = np.flatnonzero(corpus.is_test) if puzzles is None else np.asarray(puzzles, dtype=np.int64)
        self.task_offset = task_offset
        n_var = corpus.n_var[self.group_puzzle]
        self.n_var = n_var if max_variants is None else np.minimum(n_var, max_variants)
        self.offset = np.concatenate([[0], np.cumsum(self.n_var * corpus.n_test[self.group_puzzle])])

    def __len__(self) -> int:
        return int(self.offset[-1])

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"ARC test split has {len(self)} examples")
        g = np.searchsorted(self.offset, idx, side="right") - 1
        puz = self.group_puzzle[g]
        var, pair = np.divmod(idx - self.offset[g], self.corpus.n_test[puz])
        inputs, outputs, ids, tid, cmap = self.corpus.render(puz, var, self.corpus.n_train[puz] + pair, None, False)
        return make_batch(idx, inputs, outputs, ids, tid, cmap, self.task_offset + g, pair)
