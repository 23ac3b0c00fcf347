"""The run directory: resolved recipe, versions, metrics log, summary, checkpoints.

  <run>/recipe.toml        the fully resolved recipe (re-runnable with dis-run)
  <run>/run.json           versions, plugins, world size, device, parameters, command line
  <run>/metrics.jsonl      one JSON object a line: step, split, metrics, cost/*
  <run>/summary.json       the final evaluation's metrics
  <run>/checkpoints/       step_N/ directories and `latest` (see checkpoint.py)
  <run>/eval/step_N/<evaluator>/   files evaluators write (e.g. submission.json)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import tomli_w


def default_out(recipe_path: str | Path) -> Path:
    return Path("runs") / f"{Path(recipe_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run(recipe_path: str | Path) -> Path | None:
    stem = Path(recipe_path).stem
    runs = sorted(p for p in Path("runs").glob(f"{stem}-*") if p.is_dir()) if Path("runs").is_dir() else []
    return runs[-1] if runs else None


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a kill never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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

    def create(self) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            self.checkpoints.mkdir(exist_ok=True)

    def write_recipe(self, resolved: dict) -> None:
        if self.is_main:
            atomic_write(self.path / "recipe.toml", tomli_w.dumps(resolved))

    def write_json(self, name: str, data: dict) -> None:
        if self.is_main:
            atomic_write(self.path / name, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text())

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"step": step, "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, so the log reads like an unbroken run."""
        if not self.is_main or not self.metrics_file.exists():
            return
        keep = [line for line in self.metrics_file.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(self.metrics_file, "".join(line + "\n" for line in keep))

    def eval_dir(self, step: int, evaluator: str) -> Path:
        d = self.path / "eval" / f"step_{step}" / evaluator
        if self.is_main:
            d.mkdir(parents=True, exist_ok=True)
        return d
