"""`dis compare RUN_DIR [RUN_DIR ...]`: a table of finished (or running) runs, grouped by recipe
across seeds, and a plot of one metric against a training cost.

A run directory holds `run.json` ({"recipe": resolved recipe, "name", "recipe_source", "params",
per-example compute, "headline_metrics", ...}), `recipe.toml` (the same resolved recipe),
`metrics.jsonl` (one object per logged step: `step`, `split` "train" or "eval", metrics and the
`cost/*` accounting keys) and, once the run has finished, `summary.json` (final metrics named
`<evaluator>/<metric>` plus the accounting keys). Without `summary.json` the last eval row and
the last row's accounting stand in for it, so a run in progress can be compared too.

Runs whose resolved recipes are equal once `IGNORED_KEYS` are removed form one group (one row:
mean ± sample standard deviation over the seeds, and n). docs/compare.md describes the output.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import attrs

from dis_core.contract.errors import UserError
from dis_core.contract.metrics import is_per_step

STEPS, EXAMPLES, CALLS, FLOPS, WALL = (
    "cost/optimizer_steps",
    "cost/examples",
    "cost/network_calls",
    "cost/flops",
    "cost/wall_time_s",
)
# --x choice -> (accounting key, axis label)
X_AXES = {
    "train_flops": (FLOPS, "training FLOPs"),
    "train_calls": (CALLS, "training network calls"),
    "examples": (EXAMPLES, "training examples"),
    "wall": (WALL, "wall time (s)"),
    # Measured at each evaluation (diagnostics/*): what an answer costs, e.g. with adaptive halting.
    "eval_calls": ("diagnostics/calls_per_example", "network calls per test example"),
}
# Recipe keys that change the pacing or logging of a run, not what it learns: runs differing only
# in these (and the seed) are repeats of one recipe. Documented in docs/compare.md.
IGNORED_KEYS = (
    "train.seed",
    "train.eval_interval",
    "train.checkpoint_interval",
    "train.log_interval",
    "train.checkpoint_every",
    "description",
    # What changes memory and speed but not the training (the keys `--resume` may change too).
    "train.threads",
    "train.eval_batch_size",
    "train.micro_batch_size",
    "train.activation_checkpointing",
    "train.preflight",
    "loggers",
)
# For runs without `headline_metrics` in run.json (written before evaluators declared one): the
# first of these suffixes found in any run is plotted.
DEFAULT_METRICS = ("valid_solution_rate", "exact_accuracy")


@attrs.frozen
class Run:
    path: Path
    name: str
    info: dict[str, Any]  # run.json ({} when absent)
    final: dict[str, Any]  # summary.json, or its stand-in from metrics.jsonl
    rows: list[dict[str, Any]]  # metrics.jsonl
    recipe: dict[str, Any] | None = None  # run.json's "recipe", else recipe.toml; None when neither

    def recipe_value(self, *keys: str) -> Any:
        node: Any = self.recipe or {}
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def metrics(self) -> list[str]:
        """Names of the final metrics (`<evaluator>/<metric>`), per-step series in step order."""
        return sorted((k for k, v in self.final.items() if _is_metric(k) and _is_number(v)), key=_metric_order)


@attrs.frozen
class Group:
    """One table row and one plot line: the runs of one recipe (or a single run)."""

    label: str
    runs: tuple[Run, ...]


@attrs.frozen
class Series:
    """Plot data of one group: at each eval step all its runs logged, the mean x, the mean metric
    and its sample standard deviation (0 for a single run)."""

    label: str
    x: list[float]
    y: list[float]
    std: list[float]


def _metric_order(key: str) -> tuple:
    # `hamming@9` before `hamming@10`: compare the step as a number, not as text.
    name, at, step = key.partition("@")
    return (name, int(step) if step.isdigit() else -1, step)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_metric(key: str) -> bool:
    return "/" in key and not key.startswith(("cost/", "train/"))


def _read_json(path: Path, run_dir: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"run directory {run_dir}: {path.name} is not valid JSON ({exc})") from None


def _read_rows(path: Path, run_dir: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # a run still writing may leave its last line unfinished
                break
            raise UserError(f"run directory {run_dir}: metrics.jsonl line {number} is not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise UserError(f"run directory {run_dir}: metrics.jsonl line {number} is not a JSON object")
        rows.append(row)
    return rows


def _read_recipe(info: dict, run_dir: Path) -> dict | None:
    if isinstance(info.get("recipe"), dict):
        return info["recipe"]
    path = run_dir / "recipe.toml"
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"run directory {run_dir}: recipe.toml is not valid TOML ({exc})") from None


def load_run(path: str | Path) -> Run:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist or is not a directory")
    files = {name: run_dir / name for name in ("run.json", "summary.json", "metrics.jsonl")}
    if not any(f.is_file() for f in files.values()):
        raise UserError(
            f"{run_dir} is not a run directory: it has none of run.json, summary.json, metrics.jsonl"
        )
    info = _read_json(files["run.json"], run_dir) if files["run.json"].is_file() else {}
    rows = _read_rows(files["metrics.jsonl"], run_dir) if files["metrics.jsonl"].is_file() else []
    if files["summary.json"].is_file():
        final = _read_json(files["summary.json"], run_dir)
    else:
        evals = [r for r in rows if r.get("split") == "eval"]
        final = {k: v for k, v in (evals[-1] if evals else {}).items() if _is_metric(k)}
        final.update({k: v for k, v in (rows[-1] if rows else {}).items() if k.startswith("cost/")})
    for what, value in (("run.json", info), ("summary.json", final)):
        if not isinstance(value, dict):
            raise UserError(f"run directory {run_dir}: {what} must hold a JSON object")
    for key in (STEPS, EXAMPLES, CALLS, FLOPS, WALL):  # fill gaps from the latest row that has the key
        if not _is_number(final.get(key)):
            found = [r[key] for r in rows if _is_number(r.get(key))]
            if found:
                final[key] = found[-1]
    name = info.get("name") or run_dir.resolve().name
    return Run(path=run_dir, name=str(name), info=info, final=final, rows=rows, recipe=_read_recipe(info, run_dir))


def choose_metric(runs: list[Run], metric: str | None) -> str | None:
    """`metric` if some run has it; by default the first run's first headline metric that some
    run has (run.json `headline_metrics`, first evaluator first), else for runs written before
    evaluators declared one, the first */valid_solution_rate, else */exact_accuracy."""
    available = list(dict.fromkeys(m for run in runs for m in run.metrics()))
    available += [
        k for run in runs for row in run.rows if row.get("split") == "eval" for k in row
        if _is_metric(k) and k not in available
    ]
    if metric is not None:
        if metric not in available:
            raise UserError(
                f"metric {metric!r} is in none of the runs; available: {', '.join(available) or '(none)'}"
            )
        return metric
    for run in runs:
        headlines = run.info.get("headline_metrics")
        for name in headlines if isinstance(headlines, list) else []:
            if name in available:
                return name
    for suffix in DEFAULT_METRICS:
        for name in available:
            if name.endswith("/" + suffix):
                return name
    return None


# ---------------------------------------------------------------------------------------------
# Grouping


def recipe_key(run: Run) -> str | None:
    """The run's resolved recipe without IGNORED_KEYS, as canonical JSON; None without a recipe."""
    if run.recipe is None:
        return None
    recipe = copy.deepcopy(run.recipe)
    for dotted in IGNORED_KEYS:
        *parents, last = dotted.split(".")
        node = recipe
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return json.dumps(recipe, sort_keys=True, default=str)


def _stem(run: Run) -> str | None:
    source = run.info.get("recipe_source")
    return Path(source).stem if isinstance(source, str) and source else None


def group_runs(runs: list[Run], group: bool = True) -> list[Group]:
    """Groups in order of first appearance. Grouped rows are named by the recipe file's stem
    when that names exactly one group, else by the first run's name (`+k` for k more runs)."""
    members: dict[Any, list[Run]] = {}
    for i, run in enumerate(runs):
        key = recipe_key(run) if group else None
        members.setdefault(("run", i) if key is None else key, []).append(run)
    stems = [{_stem(r) for r in rs} for rs in members.values()]
    taken = Counter(stem for s in stems for stem in s)
    groups = []
    for rs, s in zip(members.values(), stems):
        stem = next(iter(s)) if len(s) == 1 else None
        named = group and stem is not None and taken[stem] == 1
        label = stem if named else rs[0].name + (f" +{len(rs) - 1}" if len(rs) > 1 else "")
        groups.append(Group(label=label, runs=tuple(rs)))
    counts = Counter(g.label for g in groups)
    return [attrs.evolve(g, label=f"{g.label} [{g.runs[0].path}]") if counts[g.label] > 1 else g for g in groups]


def distinct_seeds(groups: list[Group]) -> tuple[list[Group], list[str]]:
    """Each group with one run per seed (the first given), and a line per run left out. A run
    and its copy or resumed twin share a seed and learn the same thing: pooling both would count
    one measurement twice (n = 2, std 0)."""
    kept, notes = [], []
    for g in groups:
        first: dict[Any, Run] = {}
        runs = []
        for run in g.runs:
            seed = run.recipe_value("train", "seed")
            if seed is not None and seed in first:
                notes.append(f"{run.path} repeats seed {seed} of {first[seed].path} ({g.label}): counted once")
                continue
            first.setdefault(seed, run)
            runs.append(run)
        kept.append(attrs.evolve(g, runs=tuple(runs)))
    return kept, notes


def _stats(values: list[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation or None below two values, count) of the numbers given."""
    nums = [float(v) for v in values if _is_number(v)]
    if not nums:
        return None, None, 0
    return statistics.fmean(nums), (statistics.stdev(nums) if len(nums) > 1 else None), len(nums)


# ---------------------------------------------------------------------------------------------
# Table


def _si(value: Any) -> str:
    if not _is_number(value):
        return "-"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}"


def _flops(value: Any) -> str:
    return f"{value:.2e}" if _is_number(value) else "-"


def _wall(value: Any) -> str:
    if not _is_number(value):
        return "-"
    s = int(round(value))
    if s < 60:
        return f"{value:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _metric(value: Any) -> str:
    if not _is_number(value):
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.4g}"


def _metric_cell(values: list[Any]) -> str:
    mean, std, k = _stats(values)
    if not k:
        return "-"
    cell = _metric(mean) + (f" ± {_metric(std)}" if std is not None else "")
    return cell + (f" ({k} of {len(values)})" if k < len(values) else "")


def _mean(values: list[Any]) -> float | None:
    return _stats(values)[0]


def table_rows(groups: list[Group], metrics: list[str], *, group: bool = True) -> tuple[list[str], list[list[str]]]:
    """Training cost is the mean over a group's runs (totals for the run); evaluation cost is per
    test example, at the most steps the halting allows; metrics are mean ± std."""
    headers = ["recipe" if group else "run", *(["n"] if group else []), "task", "backbone", "targets", "halting",
               "n_sup", "params", "opt steps", "examples", "net calls", "train FLOPs", "wall",
               "eval calls/ex", "eval FLOPs/ex", *metrics]
    rows = []
    for g in groups:
        first = g.runs[0]
        final = [r.final for r in g.runs]
        info = [r.info for r in g.runs]
        rows.append([
            g.label,
            *([str(len(g.runs))] if group else []),
            str(first.recipe_value("task", "name") or "-"),
            str(first.recipe_value("backbone", "name") or "-"),
            str(first.recipe_value("targets", "name") or "-"),
            str(first.recipe_value("halting", "name") or "-"),
            str(first.recipe_value("supervision", "n_sup") or "-"),
            _si(_mean([i.get("params") for i in info])),
            _si(_mean([f.get(STEPS) for f in final])),
            _si(_mean([f.get(EXAMPLES) for f in final])),
            _si(_mean([f.get(CALLS) for f in final])),
            _flops(_mean([f.get(FLOPS) for f in final])),
            _wall(_mean([f.get(WALL) for f in final])),
            _si(_mean([i.get("network_calls_per_example_eval") for i in info])),
            _flops(_mean([i.get("flops_per_example_eval") for i in info])),
            *[_metric_cell([f.get(m) for f in final]) for m in metrics],
        ])
    return headers, rows


def render_terminal(headers: list[str], rows: list[list[str]], group: bool = True) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if _left(i, group) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def _left(column: int, group: bool) -> bool:
    """recipe/run, task, backbone, targets, halting are text (left-aligned); the rest, n
    included, are numbers."""
    first = 2 if group else 1  # task's column
    return column == 0 or first <= column < first + 4


def render_markdown(headers: list[str], rows: list[list[str]], group: bool = True) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    rule = ["---" if _left(i, group) else "---:" for i in range(len(headers))]
    return "\n".join("| " + " | ".join(map(esc, cells)) + " |" for cells in [headers, rule, *rows])


# ---------------------------------------------------------------------------------------------
# Plot


def _points(run: Run, metric: str, key: str) -> dict[int, tuple[float, float]]:
    """step -> (x, metric) at each eval row that has the metric. An eval row without the x key
    takes it from the last train row logged at or before its step. Only x > 0 (log axis)."""
    out, last = {}, None
    for row in sorted(run.rows, key=lambda r: (r.get("step", 0), r.get("split") == "eval")):
        if row.get("split") == "train" and _is_number(row.get(key)):
            last = row[key]
        if row.get("split") != "eval" or not _is_number(row.get(metric)):
            continue
        x = row.get(key, last)
        if _is_number(x) and x > 0:
            out[row.get("step", 0)] = (float(x), float(row[metric]))
    return out


def curve(run: Run, metric: str, x: str = "train_flops") -> tuple[list[float], list[float]]:
    """(x, metric) of one run at each eval row that has the metric; `x` is a key of X_AXES."""
    points = _points(run, metric, X_AXES[x][0])
    return [points[s][0] for s in sorted(points)], [points[s][1] for s in sorted(points)]


def series(groups: list[Group], metric: str, x: str = "train_flops") -> list[Series]:
    """A group's runs are averaged at the eval steps they all logged (x too: ACT runs differ in
    calls and FLOPs). A group whose runs share no eval step is drawn run by run."""
    key = X_AXES[x][0]
    out = []
    for g in groups:
        points = [_points(r, metric, key) for r in g.runs]
        common = sorted(set.intersection(*(set(p) for p in points)))
        if not common:
            out += [Series(label=f"{g.label}: {r.name}" if len(g.runs) > 1 else g.label, x=[p[s][0] for s in sorted(p)],
                           y=[p[s][1] for s in sorted(p)], std=[0.0] * len(p)) for r, p in zip(g.runs, points) if p]
            continue
        xs = [statistics.fmean(p[s][0] for p in points) for s in common]
        ys = [statistics.fmean(p[s][1] for p in points) for s in common]
        std = [statistics.stdev(p[s][1] for p in points) if len(points) > 1 else 0.0 for s in common]
        out.append(Series(label=g.label + (f" (n={len(g.runs)})" if len(g.runs) > 1 else ""), x=xs, y=ys, std=std))
    return out


def plot(lines: list[Series], metric: str, x: str, path: Path) -> None:
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    label = X_AXES[x][1]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s in lines:
        (drawn,) = ax.plot(s.x, s.y, marker="o", markersize=3, label=s.label)
        if any(s.std):
            lo = [y - d for y, d in zip(s.y, s.std)]
            hi = [y + d for y, d in zip(s.y, s.std)]
            ax.fill_between(s.x, lo, hi, color=drawn.get_color(), alpha=0.2, linewidth=0)
    if lines:
        ax.set_xscale("log")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no eval rows with {metric} and {X_AXES[x][0]}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(label)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {label}" + (" (mean ± std over seeds)" if any(any(s.std) for s in lines) else ""))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------


def compare(
    run_dirs: list[str | Path],
    metric: str | None = None,
    out: str | Path | None = None,
    *,
    x: str = "train_flops",
    group: bool = True,
    per_step: bool = False,
) -> str:
    """Load the runs and return the text to print: the aligned table (one row per recipe, or per
    run with group=False) and, with `out`, the files written. Only with `out` (a directory,
    created) are `out/compare.md` and `out/compare.png` written; the PNG plots `metric`
    (default: see choose_metric) against the training cost named by `x`."""
    if not run_dirs:
        raise UserError("dis compare needs at least one run directory")
    if x not in X_AXES:
        raise UserError(f"--x {x!r}: choose one of {', '.join(X_AXES)}")
    notes, unique = [], {}
    for d in run_dirs:
        resolved = Path(d).resolve()
        if resolved in unique:
            notes.append(f"{d} is {unique[resolved]} given again: counted once")
        else:
            unique[resolved] = d
    runs = [load_run(d) for d in unique.values()]
    groups = group_runs(runs, group)
    if group:
        groups, repeated = distinct_seeds(groups)
        notes += repeated
    chosen = choose_metric(runs, metric)
    others = [m for r in runs for m in r.metrics() if per_step or not is_per_step(m)]
    metrics = list(dict.fromkeys(([chosen] if chosen else []) + sorted(dict.fromkeys(others), key=_metric_order)))
    headers, rows = table_rows(groups, metrics, group=group)
    text = render_terminal(headers, rows, group) + "".join(f"\nnote: {n}" for n in notes)
    if out is None:
        return text

    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: not a directory (--out names the directory for compare.md and compare.png)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out_dir}: cannot create it: {exc.strerror}") from None
    md_path, png_path = out_dir / "compare.md", out_dir / "compare.png"
    parts = ["# dis compare", ""]
    parts += [f"- **{g.label}**" + (f" (n={len(g.runs)})" if group else "") + ": "
              + ", ".join(f"`{r.path}`" for r in g.runs) for g in groups]
    parts += [f"- note: {n}" for n in notes]
    parts += ["", render_markdown(headers, rows, group)]
    written = [md_path]
    if chosen:
        plot(series(groups, chosen, x), chosen, x, png_path)
        parts += ["", f"![{chosen} vs {X_AXES[x][1]}]({png_path.name})"]
        written.append(png_path)
    md_path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    note = "" if chosen else " (no headline, */valid_solution_rate or */exact_accuracy metric to plot; pass --metric)"
    return text + "\n\nwrote " + " and ".join(str(p) for p in written) + note
