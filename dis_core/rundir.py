"""The run directory: resolved recipe, versions, metrics log, summary, checkpoints.

  <run>/recipe.toml        the fully resolved recipe (re-runnable with dis-run)
  <run>/run.json           versions, plugins, world size, device, parameters, command line
  <run>/metrics.jsonl      one JSON object a line: step, split, metrics, cost/*
  <run>/summary.json       the final evaluation's metrics
  <run>/checkpoints/       step_N/ directories and `latest` (see checkpoint.py)
  <run>/eval/step_N/<evaluator>/   files evaluators write (e.g. submission.json)
  <run>/.lock              held (flock) by the run using the directory; names its pid and host

One run at a time: rank 0 holds an exclusive `flock` on `<run>/.lock` from start-up to exit (the
kernel releases it when the process dies, however it dies), so a second run into the same
directory stops at once with exit status 2, naming the holder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import structlog
import tomli_w

from dis_core.errors import RunDirError

log = structlog.get_logger()
LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # resolved run directory -> fd of its lock file, held by this process


def default_out(recipe_path: str | Path) -> Path:
    return Path("runs") / f"{Path(recipe_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run(recipe_path: str | Path) -> Path | None:
    stem = Path(recipe_path).stem
    runs = sorted(p for p in Path("runs").glob(f"{stem}-*") if p.is_dir()) if Path("runs").is_dir() else []
    return runs[-1] if runs else None


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a kill never leaves a half-written file, and a
    failed write (a full disk) leaves the old file and no temporary one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ the lock


def acquire_lock(path: Path, command: str = "") -> None:
    """Hold `<path>/.lock` for this process (a no-op when it already does). Raises `RunDirError`
    naming the holder when another process holds it."""
    key = Path(path).resolve()
    if key in _held:
        return
    lock = Path(path) / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise RunDirError(f"cannot use {path} as the run directory: {_why(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(
            f"run directory {path} is in use by another run: {holder}. Two runs in one directory would "
            f"mix their files; wait for it to end, or pass another --out"
        ) from None
    except OSError as exc:  # a file system without locks: go on, unprotected
        log.warning("cannot lock the run directory; make sure no other run uses it", path=str(path), reason=exc.strerror)
    command = command or " ".join(sys.argv)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} ({command})\n".encode(), 0)
    _held[key] = fd


def release_lock(path: Path) -> None:
    fd = _held.pop(Path(path).resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock


def _why(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror.lower()} (choose a directory you can write to with --out)"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or str(exc)


def open_run_dir(path: Path, *, resume: bool, is_main: bool = True, command: str = "") -> None:
    """Create and lock the run directory, and check it may be (re)used: a fresh run refuses a
    directory holding any earlier run's rows or checkpoints (nothing is overwritten or mixed);
    `--resume` needs one. Called before anything is built."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} is an existing file, not a directory; pass a directory path")
    if resume and not path.is_dir():
        raise RunDirError(f"--resume: there is no run directory {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create the run directory {path}: {_why(exc)}") from None
    if is_main:
        acquire_lock(path, command)
    try:
        _check_reuse(path, resume)
    except BaseException:
        if is_main:
            release_lock(path)
        raise


def _check_reuse(path: Path, resume: bool) -> None:
    run = RunDir(path)
    has_checkpoint = run.checkpoints.is_dir() and any(
        p.name == "latest" or p.name.startswith("step_") for p in run.checkpoints.iterdir()
    )
    if resume:
        return  # the trainer finds (or refuses) the checkpoint, the CLI compares the recipe
    if has_checkpoint:
        raise RunDirError(f"{path} already holds a run; pass --resume to continue it, or --out for a new directory")
    rows, bad = run.read_metrics()
    if rows or bad or (path / "summary.json").exists():
        held = f"metrics up to step {max(r['step'] for r in rows)}" if rows else "a metrics.jsonl or summary.json"
        raise RunDirError(
            f"{path} holds the files of an earlier run that stopped before its first checkpoint "
            f"({held}), so there is nothing to resume and starting over would mix "
            f"its rows with the new ones. Delete the directory (rm -r {path}) or pass another --out"
        )


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


class RunDir:
    def __init__(self, path: Path, *, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.checkpoints = self.path / "checkpoints"
        self.metrics_file = self.path / "metrics.jsonl"
        # Experiment trackers (`[[loggers]]`, dis_core.loggers.LoggerSet): they see what is written
        # here as it is written: the recipe and run.json (start), rows, summary.json (finish).
        self.loggers = None
        self._recipe: dict = {}

    def create(self) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            self.checkpoints.mkdir(exist_ok=True)

    def lock(self) -> None:
        """Create the directory and hold its lock (rank 0; a no-op if this process holds it)."""
        if self.is_main:
            self.create()
            acquire_lock(self.path)

    def write_recipe(self, resolved: dict) -> None:
        if self.is_main:
            atomic_write(self.path / "recipe.toml", tomli_w.dumps(resolved))
            self._recipe = resolved

    def write_json(self, name: str, data: dict) -> None:
        if self.is_main:
            atomic_write(self.path / name, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            if self.loggers and name == "run.json":
                self.loggers.start(self.path, self._recipe, data)
            elif self.loggers and name == "summary.json":
                self.loggers.finish(data)

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"step": step, "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.loggers:
            self.loggers.log(row)

    def read_metrics(self) -> tuple[list[dict], list[int]]:
        """(rows, numbers of the lines that are not JSON objects): a run killed while writing
        leaves a torn last line, which is reported, not fatal."""
        if not self.metrics_file.is_file():
            return [], []
        rows, bad = [], []
        for number, line in enumerate(self.metrics_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            else:
                bad.append(number)
        return rows, bad

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint (and a torn line a kill left), so the
        log reads like an unbroken run."""
        if not self.is_main or not self.metrics_file.exists():
            return
        rows, bad = self.read_metrics()
        if bad:
            log.warning("dropped unreadable metrics rows (torn by a kill)", file=str(self.metrics_file), lines=bad)
        keep = [row for row in rows if row["step"] <= step]
        atomic_write(self.metrics_file, "".join(json.dumps(row) + "\n" for row in keep))

    def eval_row(self, step: int) -> dict | None:
        """The last evaluation row logged at `step`, if any."""
        found = [r for r in self.read_metrics()[0] if r["step"] == step and r.get("split") == "eval"]
        return found[-1] if found else None

    def eval_dir(self, step: int, evaluator: str) -> Path:
        # Not created here: an evaluator that writes files creates it (most write none).
        return self.path / "eval" / f"step_{step}" / evaluator
