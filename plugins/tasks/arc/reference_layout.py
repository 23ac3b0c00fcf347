"""The TRM/HRM on-disk layout (docs/reference.md#on-disk-layout): export to it, and train from it.

    <dir>/identifiers.json            ["<blank>", "<task>", "<task>|||t<tid>|||<colour map>", ...]
    <dir>/test_puzzles.json           {task: {"train": [...], "test": [...]}} (the held-out tasks)
    <dir>/<split>/dataset.json        pad/ignore/blank ids, vocab, seq_len, counts, sets ["all"]
    <dir>/<split>/all__inputs.npy     uint8 [N_ex, 900]   (labels likewise; PAD 0 = ignore)
    <dir>/<split>/all__puzzle_identifiers.npy  int32 [N_puzzles]
    <dir>/<split>/all__puzzle_indices.npy      int32 [N_puzzles + 1] example offsets
    <dir>/<split>/all__group_indices.npy       int32 [N_groups + 1]  puzzle offsets

Export materialises what dis otherwise renders on the fly (7.3 GB for ARC-1 at 1000 variants,
~4 min), in fixed-size chunks written sequentially, so memory stays small. Reading fetches just
the rows a batch needs and samples the train split as dis does natively (one pass = every
puzzle of the largest group once, each group weighted per example), so an exported directory
read back gives exactly the same batches.

CLI (in __main__.py): python -m dis_plugins.tasks.arc OUT_DIR [--num-augmentations N] [--train-subsets ...] ...
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dis_core.contract.errors import DataError, UserError

from .augment import hash_uniform
from .dataset import _SALT_ROTATION, make_batch, task_key, variant_groups
from .encoding import SEQ_LEN, VOCAB_SIZE

SEPARATOR = "|||"
CHUNK = 4096  # examples rendered at a time while exporting


def _write_split(path: Path, corpus, puz, n_var, n_ex, first_pair, translate: bool, num_ids: int, progress: bool) -> int:
    """One split: group g = puzzle puz[g] with n_var[g] variants of n_ex[g] examples each."""
    path.mkdir(parents=True, exist_ok=True)
    per_group = n_var * n_ex
    total = int(per_group.sum())
    ids = np.concatenate([1 + corpus.var_offset[p] + np.arange(v) for p, v in zip(puz, n_var)]).astype(np.int32)
    np.save(path / "all__puzzle_identifiers.npy", ids)
    np.save(path / "all__puzzle_indices.npy", np.concatenate([[0], np.cumsum(np.repeat(n_ex, n_var))]).astype(np.int32))
    np.save(path / "all__group_indices.npy", np.concatenate([[0], np.cumsum(n_var)]).astype(np.int32))
    ends = np.cumsum(per_group)
    bar = tqdm(total=total, desc=f"export {path.name}", unit="ex", disable=not progress, leave=False)
    # Plain sequential writes after an .npy header (a write-mode memmap would keep GBs of dirty pages mapped).
    with open(path / "all__inputs.npy", "wb") as fx, open(path / "all__labels.npy", "wb") as fy:
        for f in (fx, fy):
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (total, SEQ_LEN)})
        for start in range(0, total, CHUNK):
            pos = np.arange(start, min(start + CHUNK, total))  # example rows, in group -> variant -> example order
            g = np.searchsorted(ends, pos, side="right")
            var, e = np.divmod(pos - (ends[g] - per_group[g]), n_ex[g])
            x, y, *_ = corpus.render(puz[g], var, first_pair[g] + e, n_ex[g], translate)
            fx.write(x.tobytes())
            fy.write(y.tobytes())
            bar.update(len(pos))
    bar.close()
    meta = {
        "pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": VOCAB_SIZE, "seq_len": SEQ_LEN,
        "num_puzzle_identifiers": num_ids, "total_groups": len(puz), "mean_puzzle_examples": total / max(1, len(ids)),
        "total_puzzles": len(ids), "sets": ["all"],
    }
    (path / "dataset.json").write_text(json.dumps(meta))
    return total


def export_reference_layout(task, out_dir: str | Path, progress: bool | None = None) -> dict[str, int]:
    """Write `task` (an ArcTask built from sources) in the reference layout; returns example counts."""
    out = Path(out_dir)
    corpus = task.corpus
    if corpus is None:
        raise DataError(f"{task.config.reference_dir}: this task already reads a reference directory; export needs sources")
    if corpus.side * corpus.side != SEQ_LEN:  # the reference layout is 30x30 (its seq_len 900) only
        raise UserError(f"task.config.canvas = {corpus.side}: the TRM/HRM layout has 30x30 canvases; export with canvas 30")
    progress = sys.stderr.isatty() if progress is None else progress
    train, test = task.dataset("train"), task.dataset("test")
    counts = {
        "train": _write_split(out / "train", corpus, train.group_puzzle, corpus.n_var[train.group_puzzle], train.group_size,
                              np.zeros(len(train.group_puzzle), np.int64), task.config.translate, corpus.num_ids, progress),
        "test": _write_split(out / "test", corpus, test.group_puzzle, test.n_var, corpus.n_test[test.group_puzzle],
                             corpus.n_train[test.group_puzzle], False, corpus.num_ids, progress),
    }
    names = ["<blank>"] + [corpus.name(p, v) for p in range(len(corpus.puzzles)) for v in range(corpus.n_var[p])]
    (out / "identifiers.json").write_text(json.dumps(names))
    held_out = {corpus.puzzles[p].task_id: corpus.puzzles[p].to_json() for p in test.group_puzzle}
    (out / "test_puzzles.json").write_text(json.dumps(held_out))
    return counts


_HRM_NAME = re.compile(r"^(.+)_(t[0-7])_(\d{10})$")


def _split_name(name: str) -> list[str]:
    """TRM's `<task>|||t<tid>|||<map>` or HRM's `<task>_t<tid>_<map>` (the latter unverified)."""
    if SEPARATOR in name:
        return name.split(SEPARATOR)
    m = _HRM_NAME.match(name)
    return list(m.groups()) if m else [name]


class ReferenceLayout:
    """A reference-built directory, parsed once; `split(name)` serves it like the native splits."""

    def __init__(self, root: Path, seed: int, max_test_puzzles: int | None = None):
        self.root, self.seed = root, seed
        try:
            names = json.loads((root / "identifiers.json").read_text())
        except FileNotFoundError:
            raise DataError(f"{root / 'identifiers.json'}: missing; not a TRM/HRM data directory") from None
        self.meta = {s: self._meta(s) for s in ("train", "test")}
        self.num_ids = int(self.meta["train"]["num_puzzle_identifiers"])
        # Per identifier: its task, dihedral id and colour map, parsed from the variant name.
        self.id_task = np.full(self.num_ids, -1, dtype=np.int64)
        self.id_tid = np.zeros(self.num_ids, dtype=np.int64)
        self.id_map = np.tile(np.arange(10, dtype=np.int64), (self.num_ids, 1))
        self.task_names: dict[str, int] = {}
        aug_ids, aug_tids, aug_maps = [], [], []
        for i, name in enumerate(names[1 : self.num_ids], start=1):
            base, *aug = _split_name(name)
            self.id_task[i] = self.task_names.setdefault(base, len(self.task_names))
            if aug:
                if len(aug) != 2 or not aug[0][1:].isdigit() or len(aug[1]) != 10 or not aug[1].isdigit():
                    raise DataError(f"{root / 'identifiers.json'}: identifier {i} {name!r} is not <task>|||t<tid>|||<10 digits>")
                aug_ids.append(i)
                aug_tids.append(int(aug[0][1:]))
                aug_maps.append(aug[1])
        if aug_ids:
            self.id_tid[aug_ids] = aug_tids
            digits = np.frombuffer("".join(aug_maps).encode("ascii"), dtype=np.uint8).reshape(-1, 10)
            self.id_map[aug_ids] = digits.astype(np.int64) - ord("0")
        held_out = root / "test_puzzles.json"
        if held_out.is_file():
            tests = json.loads(held_out.read_text())
            self.test_puzzles = [(name, len(p["test"])) for name, p in tests.items()]
        else:  # HRM writes none: take the test split's tasks in order of appearance
            ids = np.load(root / "test" / "all__puzzle_identifiers.npy")
            pidx = np.load(root / "test" / "all__puzzle_indices.npy")
            order = list(dict.fromkeys(_split_name(names[i])[0] for i in ids))
            size = {_split_name(names[i])[0]: int(pidx[k + 1] - pidx[k]) for k, i in enumerate(ids)}
            self.test_puzzles = [(n, size[n]) for n in order]
        self.test_puzzles = self.test_puzzles[:max_test_puzzles] if max_test_puzzles else self.test_puzzles
        by_name = {name: k for k, (name, _) in enumerate(self.test_puzzles)}
        self.task_to_test = np.array([by_name.get(n, -1) for n in self.task_names], dtype=np.int64)

    def _meta(self, split: str) -> dict:
        path = self.root / split / "dataset.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: missing; not a TRM/HRM data directory") from None
        if meta.get("vocab_size") != VOCAB_SIZE or meta.get("seq_len") != SEQ_LEN or meta.get("ignore_label_id") not in (0, None):
            raise DataError(f"{path}: not an ARC dataset (want vocab_size {VOCAB_SIZE}, seq_len {SEQ_LEN}, ignore_label_id 0)")
        return meta

    def split(self, name: str):
        return ReferenceSplit(self, name)


class _RowFile:
    """Rows of a 2-D uint8 `.npy` read with pread. A memory map would do, but on large-folio
    page caches each touched row maps ~0.5 MB, so one random batch showed GBs of RSS."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if dtype != np.uint8 or len(shape) != 2 or fortran:
            raise DataError(f"{path}: expected a C-ordered uint8 [examples, seq_len] array, got {dtype} {shape}")
        self.path, (self.n, self.width) = path, shape
        self.fd = os.open(path, os.O_RDONLY)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.width), dtype=np.uint8)
        for k, r in enumerate(np.asarray(rows).tolist()):
            out[k] = np.frombuffer(os.pread(self.fd, self.width, self.offset + r * self.width), dtype=np.uint8)
        return out

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


class ReferenceSplit:
    def __init__(self, layout: ReferenceLayout, name: str):
        d = layout.root / name
        self.layout, self.train = layout, name == "train"
        self.inputs = _RowFile(d / "all__inputs.npy")
        self.labels = _RowFile(d / "all__labels.npy")
        self.ids = np.load(d / "all__puzzle_identifiers.npy").astype(np.int64)
        self.pidx = np.load(d / "all__puzzle_indices.npy").astype(np.int64)
        gidx = np.load(d / "all__group_indices.npy").astype(np.int64)
        if self.train:
            self.group_first = gidx[:-1]
            self.group_puzzles = np.diff(gidx)
            self.puzzle_size = np.diff(self.pidx)
            self.group_size = self.puzzle_size[self.group_first]  # E_g
            self.example_offset = np.concatenate([[0], np.cumsum(self.group_size)])
            self.rounds = int(self.group_puzzles.max()) if len(gidx) > 1 else 0
            keys = np.array([task_key(n) for n in layout.task_names], dtype=np.int64)[layout.id_task[self.ids[self.group_first]]]
            self.rotation = hash_uniform(self.group_puzzles, layout.seed, keys, _SALT_ROTATION)
        else:
            puzzle_test = layout.task_to_test[layout.id_task[self.ids]]
            self.rows = np.flatnonzero(np.repeat(puzzle_test >= 0, np.diff(self.pidx)))  # examples of the kept test tasks

    def __len__(self) -> int:
        return self.rounds * int(self.example_offset[-1]) if self.train else len(self.rows)

    def groups(self):
        """As the native train split's: a puzzle is one variant's E_g examples in index space
        (a variant stored with another size is read cyclically, as `get` does)."""
        return variant_groups(self.example_offset, self.group_puzzles) if self.train else None

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"reference {'train' if self.train else 'test'} split has {len(self)} examples")
        if self.train:
            rnd, k = np.divmod(idx, self.example_offset[-1])
            g = np.searchsorted(self.example_offset, k, side="right") - 1
            puzzle = self.group_first[g] + (rnd + self.rotation[g]) % self.group_puzzles[g]
            rows = self.pidx[puzzle] + (k - self.example_offset[g]) % self.puzzle_size[puzzle]
            task, pair = -1, -1
        else:
            rows = self.rows[idx]
            puzzle = np.searchsorted(self.pidx, rows, side="right") - 1
            task, pair = self.layout.task_to_test[self.layout.id_task[self.ids[puzzle]]], rows - self.pidx[puzzle]
        pid = self.ids[puzzle]
        lay = self.layout
        return make_batch(idx, self.inputs[rows], self.labels[rows], pid, lay.id_tid[pid], lay.id_map[pid], task, pair)
