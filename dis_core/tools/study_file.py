"""The study file of `dis study` (docs/study.md): its classes, read strictly through the project's
cattrs converter, so that every problem is reported at once, each with its key path, and the
file named (exit status 2).

    name = "nqueens_dis_vs_trm"                       # default: the file's stem
    seeds = [0, 1, 2]                                 # the first tunes the grid
    metric = "nqueens/valid_solution_rate"            # default: the recipes' headline metric
    budget = ["train.steps=1500"]                     # --set overrides of every run
    [[arms]]
    name = "dis"
    recipe = "../recipes/nqueens_quick.toml"          # relative to the study file
    set = ["train.schedule.warmup_steps=100"]         # --set overrides of this arm
    grid = { "train.optimizer.config.lr" = [1e-3, 3e-3] }

Imported by the `dis` parser: only the standard library and attrs at the top.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Literal

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dis_core.contract.errors import UserError

# Set by the study for every run: a study file may not set them.
STUDY_KEYS = ("train.seed", "eval.split", "train.keep_best", "train.keep_best_mode", "train.checkpoint_interval",
              "train.keep_checkpoints", "train.threads")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class StudyError(UserError):
    """One or more problems in a study file, each addressed by key path."""

    def __init__(self, problems: list[str], source: str):
        self.problems, self.source = list(problems), source
        super().__init__(f"{len(self.problems)} problem(s) in study {source}:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _name(_inst, attr, value) -> None:
    if value is not None and not NAME.fullmatch(value):
        raise ValueError(f"{attr.name} names directories: letters, digits, '_', '.' and '-' only, got {value!r}")


def _seeds(_inst, attr, value) -> None:
    if not value or len(set(value)) < len(value) or not all(0 <= s <= 2**32 - 1 for s in value):
        raise ValueError(f"seeds must be distinct integers in [0, 2^32 - 1], at least one, got {list(value)}")


def _arms(_inst, attr, value) -> None:
    names = [a.name for a in value]
    if not value or len(set(names)) < len(names):
        raise ValueError(f"arms need at least one [[arms]] table, each with its own name, got {names}")


@attrs.frozen(kw_only=True)
class Arm:
    name: str = attrs.field(validator=_name)  # names its runs' directories
    recipe: Path  # relative to the study file
    set: tuple[str, ...] = ()  # `--set` KEY=VALUE overrides of this arm
    grid: dict[str, tuple[Any, ...]] = attrs.field(factory=dict)  # recipe key -> the values to tune


@attrs.frozen(kw_only=True)
class StudyFile:
    name: str | None = attrs.field(default=None, validator=_name)  # None: the file's stem
    description: str = ""
    seeds: tuple[int, ...] = attrs.field(default=(0, 1, 2), validator=_seeds)  # the first tunes the grid
    metric: str | None = None  # None: the first evaluator's headline metric
    mode: Literal["max", "min"] = "max"  # whether larger or smaller `metric` is better
    budget: tuple[str, ...] = ()  # `--set` overrides of every run, after the arms' own and the grid's
    arms: tuple[Arm, ...] = attrs.field(validator=_arms)


@attrs.frozen
class Study:
    spec: StudyFile
    path: Path

    @property
    def name(self) -> str:
        return self.spec.name or self.path.stem


def toml_value(value: Any) -> str:
    """A value as the right-hand side of `--set KEY=VALUE` (a TOML value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)  # dates and times: TOML's own text


def load_study(path: str | Path) -> Study:
    """The study file, checked strictly: every problem in one `StudyError`, each with its key path."""
    from dis_core.wiring.config import structure

    path = Path(path)
    if path.is_dir():
        raise StudyError([f"{path} is a directory, not a study file"], str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(["file not found"], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise StudyError([f"not valid TOML: {exc}"], str(path)) from None
    except UnicodeDecodeError:
        raise StudyError(["not UTF-8 text"], str(path)) from None
    problems = []
    for a, arm in enumerate(data.get("arms") or []):  # cattrs would read a string as a tuple of characters
        grid = arm.get("grid") if isinstance(arm, dict) else None
        for key, values in (grid.items() if isinstance(grid, dict) else ()):
            if not isinstance(values, list) or not values:
                problems.append(f"a grid key takes a non-empty array of values, got {values!r} @ $.arms[{a}].grid['{key}']")
    spec, found = structure(data, StudyFile, "$")
    problems += [f for f in found if not any(f.endswith(p[p.rindex(" @ "):]) for p in problems)]  # said once
    if spec is not None and not problems:
        problems += _problems(spec, path.parent)
    if problems:
        raise StudyError(problems, str(path))
    return Study(spec=spec, path=path)


def _problems(spec: StudyFile, folder: Path) -> list[str]:
    out: list[str] = []
    budget = {key: i for i, text in enumerate(spec.budget) if (key := _override_key(text, f"$.budget[{i}]", out))}
    for a, arm in enumerate(spec.arms):
        at = f"$.arms[{a}]"
        if not (folder / arm.recipe).is_file():
            out.append(f"recipe file not found: {arm.recipe} (looked at {folder / arm.recipe}; relative to the study file) "
                       f"@ {at}.recipe")
        for i, text in enumerate(arm.set):
            _override_key(text, f"{at}.set[{i}]", out)
        for key, values in arm.grid.items():
            where = f"{at}.grid['{key}']"
            _override_key(f"{key}=0", where, out)
            if key in budget:
                out.append(f"{key} is fixed for every run by budget[{budget[key]}]; tune it or fix it, not both @ {where}")
            if len({toml_value(v) for v in values}) < len(values):
                out.append(f"the grid lists a value twice: {list(values)} @ {where}")
    if spec.metric is not None and "/" not in spec.metric:
        out.append(f"metric names <evaluator>/<metric>, e.g. nqueens/valid_solution_rate, got {spec.metric!r} @ $.metric")
    return out


def _override_key(text: str, where: str, out: list[str]) -> str | None:
    from dis_core.contract.errors import RecipeError
    from dis_core.wiring.recipe import parse_override

    try:
        keys, _ = parse_override(text)
    except RecipeError as exc:
        out += [f"{p} @ {where}" for p in exc.problems]
        return None
    key = ".".join(keys)
    if key in STUDY_KEYS:
        out.append(f"{key} is set by dis study for every run (the seeds, selection on the validation split, the "
                   f"threads); leave it out @ {where}")
    return key
