"""Experiment trackers: the `logger` components of a recipe's `[[loggers]]`, fed by the trainer.

A logger receives what the run writes, as `RunDir` writes it: the resolved recipe and run.json
(`start`), every row of metrics.jsonl (`log`), the trajectory PNGs of each evaluation
(`train.eval_trajectories`, `images`) and summary.json (`finish`). Only rank 0 has loggers. A
run without `[[loggers]]` has none and nothing changes. A run that stops before summary.json
(an error, a kill, a test's `stop_after`) finishes its loggers with None when the process exits.

A tracker that fails in the middle of a long run (a network outage, a full quota) must not kill
the run: after `start` succeeded, an exception of a logger is logged as a warning naming it and
that logger is dropped; metrics.jsonl stays the record. `start` failing stops the run before it
trains (exit status 2), since the recipe asked for that tracker.
"""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

import structlog

from dis_core.contract.errors import UserError

log = structlog.get_logger()


class LoggerSet:
    """The run's loggers, in recipe order, each isolated from the others' failures."""

    def __init__(self, loggers: dict[str, Any] | None = None):
        self.loggers = dict(loggers or {})
        self.started = False

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def start(self, run_dir: Path, recipe: dict, info: dict) -> None:
        for name, lg in self.loggers.items():
            try:
                lg.start(Path(run_dir), recipe, info)
            except Exception as exc:
                raise UserError(f"logger {name!r} could not start: {type(exc).__name__}: {exc}") from exc
        self.started = True
        atexit.register(self.finish, None)  # a no-op once finished

    def _each(self, what: str, *args) -> None:
        for name in list(self.loggers):
            try:
                getattr(self.loggers[name], what)(*args)
            except Exception as exc:
                log.warning("logger failed and is dropped for the rest of the run (metrics.jsonl is unaffected)",
                            logger=name, during=what, error=f"{type(exc).__name__}: {exc}"[:300])
                self.loggers.pop(name)

    def log(self, row: dict) -> None:
        if self.started:
            self._each("log", row)

    def images(self, step: int, paths: list[Path]) -> None:
        if self.started and paths:
            self._each("images", step, list(paths))

    def finish(self, summary: dict | None) -> None:
        """`summary` is summary.json, or None when the run stops early (an error, a kill, a
        test's `stop_after`)."""
        if self.started:
            self.started = False
            atexit.unregister(self.finish)
            self._each("finish", summary)


def numeric(row: dict) -> dict[str, float]:
    """The metrics of a metrics.jsonl row that trackers plot: numbers, without `step`/`split`."""
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
