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

Nothing the user wrote is overwritten: a run directory is new, empty, or a dis run (it holds
dis's run.json, metrics or checkpoints); anything else is refused, naming what it holds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import structlog
import tomli_w

from dis_core.contract.errors import RunDirError

log = structlog.get_logger()
LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # resolved run directory -> fd of its lock file, held by this process


def default_out(recipe_path: str | Path) -> Path:
    """`runs/<stem>-<date>-<time>`, with `-2`, `-3` ... when a run of that name started in the same second."""
    base = Path("runs") / f"{Path(recipe_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def latest_run(recipe_path: str | Path) -> Path | None:
    """The newest `runs/<stem>-<date>-<time>[-n]` started from this recipe file. Names alone
    would also match `runs/<stem>-copy-...` (another recipe) or a same-named recipe elsewhere, so
    the recipe file recorded in run.json must be this one, however either path was typed."""
    name = re.compile(re.escape(Path(recipe_path).stem) + r"-(\d{8}-\d{6})(?:-(\d+))?")
    found = [(m, p) for p in Path("runs").iterdir() if (m := name.fullmatch(p.name)) and p.is_dir()] if Path("runs").is_dir() else []
    runs = [p for _, p in sorted(found, key=lambda mp: (mp[0].group(1), int(mp[0].group(2) or 1)))]
    mine = Path(recipe_path).resolve()
    for run in reversed(runs):
        recorded = recorded_recipe(run)
        # No run.json: killed while building; only its name is known, and it is this recipe's.
        if recorded is None or Path(recorded).resolve() == mine:
            return run
    return None


def recorded_recipe(run: Path) -> str | None:
    """The recipe file a run was started from, as run.json records it (an absolute path since
    `recipe_path` exists; before that, as typed, relative to where runs/ is)."""
    info = _read_json(Path(run) / "run.json")
    if not isinstance(info, dict):
        return None
    recorded = info.get("recipe_path") or info.get("recipe_source")
    return recorded if isinstance(recorded, str) else None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    # A path that is not UTF-8 (a byte the file system allows) reaches here as a surrogate escape.
    line = f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} ({command})\n"
    os.pwrite(fd, line.encode("utf-8", "backslashreplace"), 0)
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
    """Create and lock the run directory, and check it may be (re)used: a directory holding
    files dis did not write is refused (before anything is written into it); a fresh run refuses
    a directory holding any earlier run's rows or checkpoints (nothing is overwritten or mixed);
    `--resume` continues one, or starts it again when it has no checkpoint. Called before
    anything is built."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} is an existing file, not a directory; pass a directory path")
    if resume and not path.is_dir():
        raise RunDirError(f"--resume: there is no run directory {path}")
    _check_foreign(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create the run directory {path}: {_why(exc)}") from None
    if is_main:
        _check_writable(path, resume)
        acquire_lock(path, command)
    try:
        _check_reuse(path, resume)
    except BaseException:
        if is_main:
            release_lock(path)
        raise


def _has_checkpoint(path: Path) -> bool:
    ckpts = Path(path) / "checkpoints"
    return ckpts.is_dir() and any(p.name == "latest" or p.name.startswith("step_") for p in ckpts.iterdir())


def is_run(path: Path) -> bool:
    """Whether `path` holds a dis run: dis's run.json, metrics or summary, or a checkpoint."""
    path = Path(path)
    info = _read_json(path / "run.json")
    written_by_dis = isinstance(info, dict) and "recipe" in info and "versions" in info
    return written_by_dis or (path / "metrics.jsonl").is_file() or (path / "summary.json").is_file() or _has_checkpoint(path)


def _leftover(entry: Path) -> bool:
    """What a run that ended before writing anything leaves: its lock file, an empty
    checkpoints/ or eval/ folder, a temporary file of an interrupted write."""
    if entry.name == LOCK_FILE or re.fullmatch(r"\..+\.tmp\d+", entry.name):
        return True
    return entry.name in ("checkpoints", "eval") and entry.is_dir() and not any(entry.iterdir())


def remove_unused(path: Path) -> bool:
    """Remove the run directory `path` if it holds only what a run that stopped before writing
    anything leaves (`_leftover`); True if removed."""
    path = Path(path)
    try:
        if not path.is_dir() or not all(_leftover(p) for p in path.iterdir()):
            return False
        shutil.rmtree(path)
    except OSError:
        return False
    return True


def _check_foreign(path: Path) -> None:
    """Refuse a directory that is neither empty (leftovers aside) nor a dis run: dis would write
    its recipe.toml, run.json and metrics over or among the user's own files (a hand-written
    recipe.toml, say)."""
    if not path.is_dir() or is_run(path):
        return
    try:
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if not _leftover(p))
    except OSError as exc:
        raise RunDirError(f"cannot read the run directory {path}: {_why(exc)}") from None
    if held:
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise RunDirError(
            f"--out {path} holds files that are not a dis run ({shown}); dis writes only into a new or empty "
            f"directory or an earlier run's, so that nothing of yours is overwritten. Pass another --out, "
            f"e.g. {path / 'run'}"
        )


def _check_writable(path: Path, resume: bool) -> None:
    """Before anything is built: the places a run (re)writes must be writable, or a resumed run
    would train until its first checkpoint and only then fail."""
    places = [path, path / "checkpoints", path / "metrics.jsonl"]
    for place in places:
        if place.exists() and not os.access(place, os.W_OK | (os.X_OK if place.is_dir() else 0)):
            todo = (f"make it writable (chmod -R u+w {path}) to resume the run" if resume
                    else "choose a directory you can write to with --out")
            why = "read-only file system" if _read_only_fs(place) else "permission denied"
            raise RunDirError(f"cannot write to {place}: {why}; {todo}")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_reuse(path: Path, resume: bool) -> None:
    run = RunDir(path)
    if resume:
        return  # the trainer finds the checkpoint (or starts again without one), the CLI compares the recipe
    if _has_checkpoint(path):
        raise RunDirError(f"{path} already holds a run; pass --resume to continue it, or --out for a new directory")
    rows, bad = run.read_metrics()
    if rows or bad or (path / "summary.json").exists():
        held = f"metrics up to step {max(r['step'] for r in rows)}" if rows else "a metrics.jsonl or summary.json"
        raise RunDirError(
            f"{path} holds the files of an earlier run that stopped before its first checkpoint "
            f"({held}); starting over here would mix its rows with the new ones. Pass --resume to start it "
            f"again from step 0 in place (its rows are dropped), or another --out"
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
        # Experiment trackers (`[[loggers]]`, dis_core.outputs.loggers.LoggerSet): they see what is written
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

    def truncate_metrics(self, step: int) -> int:
        """On resume: drop rows logged after the checkpoint (and a torn line a kill left), so the
        log reads like an unbroken run. Returns the number of rows dropped."""
        if not self.is_main or not self.metrics_file.exists():
            return 0
        rows, bad = self.read_metrics()
        if bad:
            log.warning("dropped unreadable metrics rows (torn by a kill)", file=str(self.metrics_file), lines=bad)
        keep = [row for row in rows if row["step"] <= step]
        atomic_write(self.metrics_file, "".join(json.dumps(row) + "\n" for row in keep))
        return len(rows) - len(keep)

    def eval_row(self, step: int) -> dict | None:
        """The last evaluation row logged at `step`, if any."""
        found = [r for r in self.read_metrics()[0] if r["step"] == step and r.get("split") == "eval"]
        return found[-1] if found else None

    def eval_dir(self, step: int, evaluator: str) -> Path:
        # Not created here: an evaluator that writes files creates it (most write none).
        return self.path / "eval" / f"step_{step}" / evaluator
