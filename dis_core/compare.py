"""`dis compare RUN_DIR [RUN_DIR ...]`: a table of finished (or running) runs, and a plot of one
metric against training FLOPs.

A run directory holds `run.json` ({"recipe": resolved recipe, "name", "params", ...}),
`metrics.jsonl` (one object per logged step: `step`, `split` "train" or "eval", metrics and the
`cost/*` accounting keys) and, once the run has finished, `summary.json` (final metrics named
`<evaluator>/<metric>` plus the accounting keys). Without `summary.json` the last eval row and
the last row's accounting stand in for it, so a run in progress can be compared too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs

from dis_core.errors import UserError

STEPS, EXAMPLES, CALLS, FLOPS, WALL = (
    "cost/optimizer_steps",
    "cost/examples",
    "cost/network_calls",
    "cost/flops",
    "cost/wall_time_s",
)
# Preferred default metrics, in order: the first found in any run is plotted.
DEFAULT_METRICS = ("valid_solution_rate", "exact_accuracy")


@attrs.frozen
class Run:
    path: Path
    name: str
    info: dict[str, Any]  # run.json ({} when absent)
    final: dict[str, Any]  # summary.json, or its stand-in from metrics.jsonl
    rows: list[dict[str, Any]]  # metrics.jsonl

    def recipe_value(self, *keys: str) -> Any:
        node: Any = self.info.get("recipe", {})
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def metrics(self) -> list[str]:
        """Names of the final metrics (`<evaluator>/<metric>`), per-step series in step order."""
        return sorted((k for k, v in self.final.items() if _is_metric(k) and _is_number(v)), key=_metric_order)


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
    return Run(path=run_dir, name=str(name), info=info, final=final, rows=rows)


def choose_metric(runs: list[Run], metric: str | None) -> str | None:
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
    for suffix in DEFAULT_METRICS:
        for name in available:
            if name.endswith("/" + suffix):
                return name
    return None


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


def table_rows(runs: list[Run], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    headers = ["run", "task", "backbone", "targets", "halting", "n_sup", "params",
               "opt steps", "examples", "net calls", "train FLOPs", "wall", *metrics]
    rows = []
    for run in runs:
        f = run.final
        rows.append([
            run.name,
            str(run.recipe_value("task", "name") or "-"),
            str(run.recipe_value("backbone", "name") or "-"),
            str(run.recipe_value("targets", "name") or "-"),
            str(run.recipe_value("halting", "name") or "-"),
            str(run.recipe_value("supervision", "n_sup") or "-"),
            _si(run.info.get("params")),
            _si(f.get(STEPS)),
            _si(f.get(EXAMPLES)),
            _si(f.get(CALLS)),
            _flops(f.get(FLOPS)),
            _wall(f.get(WALL)),
            *[_metric(f.get(m)) for m in metrics],
        ])
    return headers, rows


_TEXT_COLUMNS = 5  # run, task, backbone, targets, halting: left-aligned; the rest are numbers


def render_terminal(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i < _TEXT_COLUMNS else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def render_markdown(headers: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    rule = ["---" if i < _TEXT_COLUMNS else "---:" for i in range(len(headers))]
    return "\n".join("| " + " | ".join(map(esc, cells)) + " |" for cells in [headers, rule, *rows])


# ---------------------------------------------------------------------------------------------
# Plot


def curve(run: Run, metric: str) -> tuple[list[float], list[float]]:
    """(training FLOPs, metric) at each eval row that has the metric. An eval row without
    `cost/flops` takes it from the last train row logged at or before its step."""
    xs, ys, last_flops = [], [], None
    for row in sorted(run.rows, key=lambda r: (r.get("step", 0), r.get("split") == "eval")):
        if row.get("split") == "train" and _is_number(row.get(FLOPS)):
            last_flops = row[FLOPS]
        if row.get("split") != "eval" or not _is_number(row.get(metric)):
            continue
        x = row.get(FLOPS, last_flops)
        if _is_number(x) and x > 0:  # log axis
            xs.append(float(x))
            ys.append(float(row[metric]))
    return xs, ys


def plot(runs: list[Run], metric: str, path: Path) -> None:
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for run in runs:
        xs, ys = curve(run, metric)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=run.name)
            drawn += 1
    if drawn:
        ax.set_xscale("log")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no eval rows with {metric} and cost/flops", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs training compute")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------


def _unique_names(runs: list[Run]) -> list[Run]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    return [attrs.evolve(r, name=f"{r.name} [{r.path}]") if counts[r.name] > 1 else r for r in runs]


def compare(run_dirs: list[str | Path], metric: str | None = None, out: str | Path | None = None) -> str:
    """Load the runs, write `out` (Markdown, default ./compare.md) and a PNG beside it (same
    name, .png) plotting `metric` (default: the first */valid_solution_rate, else
    */exact_accuracy) against training FLOPs. Returns the text to print: the aligned table
    and the files written."""
    if not run_dirs:
        raise UserError("dis compare needs at least one run directory")
    runs = _unique_names([load_run(d) for d in run_dirs])
    chosen = choose_metric(runs, metric)
    metrics = list(dict.fromkeys(([chosen] if chosen else []) + [m for r in runs for m in r.metrics()]))
    headers, rows = table_rows(runs, metrics)

    md_path = Path(out) if out is not None else Path("compare.md")
    png_path = md_path.with_suffix(".png")
    try:
        md_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {md_path}: cannot create {md_path.parent}: {exc.strerror}") from None
    parts = ["# dis compare", "", "Runs: " + ", ".join(f"`{r.path}`" for r in runs), "", render_markdown(headers, rows)]
    written = [md_path]
    if chosen:
        plot(runs, chosen, png_path)
        parts += ["", f"![{chosen} vs training FLOPs]({png_path.name})"]
        written.append(png_path)
    md_path.write_text("\n".join(parts) + "\n", encoding="utf-8")

    text = render_terminal(headers, rows)
    note = "" if chosen else " (no */valid_solution_rate or */exact_accuracy metric to plot; pass --metric)"
    return text + "\n\nwrote " + " and ".join(str(p) for p in written) + note
