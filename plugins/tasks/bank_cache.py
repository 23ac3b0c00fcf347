"""On-disk cache of generated puzzle banks, shared by the generated tasks (Sudoku, Maze).

A bank is a dict of numpy arrays. It is stored as `<data_dir>/<task>/<split>-<tag>-<digest>.npz`,
where the digest covers everything that determines its content, and written through a temporary
file and a rename, so ranks building the same bank at once never see a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dis_core.errors import UserError

Bank = dict[str, np.ndarray]


def cached_bank(data_dir: Path, task: str, split: str, tag: str, key: list, make: Callable[[], Bank], *, enabled: bool = True) -> Bank:
    """The bank identified by `key`: loaded if cached, else made by `make()` (and cached)."""
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
    path = Path(data_dir) / task / f"{split}-{tag}-{digest}.npz"
    if enabled and path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    bank = make()
    if enabled:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".{time.time_ns()}.tmp.npz")
        np.savez(tmp, **bank)
        tmp.replace(path)
    return bank


def memoised_split(banks: dict[str, Bank], task: str, split: str, load: Callable[[str], Bank]) -> Bank:
    """`banks[split]`, loading it on first use; a split other than train/test is a user error."""
    if split not in ("train", "test"):
        raise UserError(f"task {task} has the splits 'train' and 'test', not {split!r}")
    if split not in banks:
        banks[split] = load(split)
    return banks[split]


def split_seed(seed: int, split: str) -> int:
    """Independent generator seeds for the train and test banks of one data seed."""
    return int(np.random.SeedSequence([seed, 0 if split == "train" else 1]).generate_state(1)[0])
