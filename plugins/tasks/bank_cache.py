"""On-disk cache of generated puzzle banks, shared by the generated tasks (Sudoku, Maze).

A bank is a dict of numpy arrays. It is stored as `<data_dir>/<task>/<split>-<tag>-<digest>.npz`,
where the digest covers everything that determines its content, and written through a temporary
file and a rename, so ranks building the same bank at once never see a half-written file.

Also the split rules both tasks share: the splits "train", "test" and "valid", a generator seed
per split, and the validation split of imported data (a `valid_fraction` carve-out, or an error).
"""

from __future__ import annotations

import errno
import hashlib
import json
import contextlib
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import structlog

from dis_core.contract.errors import DataError, UserError

log = structlog.get_logger()

Bank = dict[str, np.ndarray]


def cached_bank(data_dir: Path, task: str, split: str, tag: str, key: list, make: Callable[[], Bank], *, enabled: bool = True) -> Bank:
    """The bank identified by `key`: loaded if cached, else made by `make()` (and cached)."""
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
    path = Path(data_dir) / task / f"{split}-{tag}-{digest}.npz"
    if enabled:
        _check_cache_path(Path(data_dir), path)
    if enabled and path.is_file():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # e.g. a copy cut short
            log.warning("cached data unreadable; making it again", path=str(path), reason=str(exc)[:200])
    bank = make()
    if enabled:
        tmp = path.with_name(path.stem + f".{time.time_ns()}.tmp.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **bank)
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)  # never leave a partial file behind (e.g. a full disk)
            if exc.errno == errno.ENOSPC:
                raise UserError(
                    f"no space left on the device while writing {path}: free some space, or pass --data-dir "
                    f"on another disk (nothing partial was left behind)"
                ) from None
            raise UserError(f"cannot write the prepared data {path}: {exc.strerror or exc} (pass another --data-dir)") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return bank


def _check_cache_path(data_dir: Path, path: Path) -> None:
    """Clear messages for what stands in the way of the cache file."""
    for p in (data_dir, path.parent):
        if p.exists() and not p.is_dir():
            raise UserError(f"the data directory {p} is a file, not a directory (pass --data-dir DIR)")
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is a directory, but dis keeps a prepared data file there; remove it (or pass another --data-dir)")


SPLITS = ("train", "test", "valid")


def memoised_split(banks: dict[str, Bank], task: str, split: str, load: Callable[[str], Bank]) -> Bank:
    """`banks[split]`, loading it on first use; a split other than train/test/valid is a user error."""
    if split not in SPLITS:
        raise UserError(f"task {task} has the splits 'train', 'test' and 'valid', not {split!r}")
    if split not in banks:
        banks[split] = load(split)
    return banks[split]


def split_seed(seed: int, split: str) -> int:
    """Independent generator seeds for the train, test and valid banks of one data seed."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def questions_digest(*banks: Bank) -> str:
    """A digest of the banks' questions: what a validation bank generated to avoid them depends on."""
    h = hashlib.sha1()
    for bank in banks:
        h.update(np.ascontiguousarray(bank["question"]).tobytes())
    return h.hexdigest()[:16]


def held_out(count: int, fraction: float, seed: int, task: str) -> np.ndarray:
    """(count,) bool: the imported training puzzles held out as the validation split
    (`valid_fraction` of them, at least one, chosen by the data seed)."""
    k = max(1, round(fraction * count))
    if k >= count:
        raise UserError(f"task {task}: valid_fraction {fraction} holds out {k} of the {count} training puzzles, "
                        f"leaving none to train on; lower it")
    mask = np.zeros(count, dtype=bool)
    mask[np.random.default_rng([seed, SPLITS.index("valid")]).choice(count, k, replace=False)] = True
    return mask


def no_valid_split(task: str) -> UserError:
    """The error for a validation split asked of imported data without `valid_fraction`."""
    return UserError(
        f"task {task} has no validation split: its training puzzles come from csv_train, which has none; set "
        f"task.config.valid_fraction (e.g. 0.1) to hold that share of them out of training as the 'valid' split"
    )


@contextlib.contextmanager
def utf8_text(path: Path):
    """Around reading a text file opened as UTF-8: a file in another encoding becomes a
    `DataError` naming the file, the line and the byte."""
    try:
        yield
    except UnicodeDecodeError:
        data = Path(path).read_bytes()
        try:
            data.decode("utf-8")
            where, byte = str(path), ""
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            where, byte = f"{path}:{line}", f" (byte 0x{data[exc.start]:02x})"
        raise DataError(f"{where}: not UTF-8 text{byte}; save the file as UTF-8") from None
