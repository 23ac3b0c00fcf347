"""What `dis study` reads back from its runs, how it selects, and the report it writes.

Selection (docs/study.md): a run's validation curve is the metric at each of its evaluations
(`metrics.jsonl` rows with `split` "eval"; the study trains with `eval.split = "valid"`). A run's
score is its best validation value, ties going to the later evaluation (the checkpoint that
`train.keep_best` spares); its chosen checkpoint is the kept checkpoint with that score. Each
arm's grid point is the one whose first-seed run scores best (ties: the first in grid order).
Only the chosen checkpoints of the chosen point's runs are evaluated on the test split.

Intervals: a two-sided 95% Student t-interval over seeds, mean ± t(0.975, n - 1) · s / sqrt(n),
for each arm's test metric and for the paired differences between arms (by seed). Collapse: a
run whose last validation value is worse than its best by more than its arm's spread, the sample
standard deviation of the best validation values of the arm's seeds at the chosen point (0 with
fewer than two seeds, so that any drop is flagged).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import attrs

from dis_core.tools.compare import CALLS, EXAMPLES, FLOPS, STEPS, WALL, Run, _flops, _is_number, _si, load_run

LEVEL = 0.95
TEST_DIR = "study_test"  # RUN_DIR/study_test/metrics.json: the one test evaluation of a chosen run
STATUS_SUFFIX = ".status.json"  # OUT/logs/<run>.status.json: the exit status of a run that did not finish


# ---------------------------------------------------------------------------------------------
# Student t, without scipy


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom, p in (0.5, 1), by bisection."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2.0


def t_interval(values: list[float], level: float = LEVEL) -> dict[str, Any]:
    """{"n", "mean", "std", "low", "high"}: the mean with its two-sided t-interval over the values
    (low/high and std None below two values)."""
    n = len(values)
    if not n:
        return {"n": 0, "mean": None, "std": None, "low": None, "high": None}
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "low": None, "high": None}
    std = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


# ---------------------------------------------------------------------------------------------
# One run


@attrs.frozen
class RunResult:
    """What the study knows of one run directory."""

    path: Path
    status: str  # "finished", "diverged" (exit 3), "failed" (another exit status), "missing", "partial"
    curve: tuple[tuple[int, float], ...] = ()  # (step, validation metric) at each evaluation
    checkpoint: Path | None = None  # the kept checkpoint with the best validation score
    test: dict | None = None  # RUN/study_test/metrics.json's metrics, when made for `checkpoint`
    run: Run | None = None

    def best(self, mode: str) -> tuple[int, float] | None:
        """(step, value) of the best evaluation; ties: the later one."""
        if not self.curve:
            return None
        sign = 1.0 if mode == "max" else -1.0
        return max(self.curve, key=lambda sv: (sign * sv[1], sv[0]))

    @property
    def last(self) -> tuple[int, float] | None:
        return self.curve[-1] if self.curve else None


def read_run(path: Path, metric: str, mode: str, logs: Path | None = None) -> RunResult:
    if (path / "summary.json").is_file():
        status = "finished"
    elif logs is not None and (logs / (path.name + STATUS_SUFFIX)).is_file():
        rc = json.loads((logs / (path.name + STATUS_SUFFIX)).read_text()).get("rc")
        status = "diverged" if rc == 3 else "failed"
    else:
        status = "partial" if path.is_dir() else "missing"
    if not path.is_dir() or not any((path / f).is_file() for f in ("run.json", "summary.json", "metrics.jsonl")):
        return RunResult(path=path, status=status)
    run = load_run(path)
    points: dict[int, float] = {}
    for row in run.rows:
        if row.get("split") == "eval" and _is_number(row.get(metric)) and math.isfinite(row[metric]):
            points[int(row.get("step", 0))] = float(row[metric])
    world = int(run.info.get("world_size") or 1)
    checkpoint = best_checkpoint(path, metric, mode, world, points) if status == "finished" else None
    test = None
    record = path / TEST_DIR / "metrics.json"
    if checkpoint is not None and record.is_file():
        saved = json.loads(record.read_text())
        if Path(saved.get("checkpoint", "")).resolve() == checkpoint.resolve():
            test = saved.get("metrics")
    return RunResult(path=path, status=status, curve=tuple(sorted(points.items())), checkpoint=checkpoint, test=test, run=run)


def best_checkpoint(run_dir: Path, metric: str, mode: str, world: int = 1, curve: dict[int, float] | None = None) -> Path | None:
    """The complete checkpoint whose evaluation scores best on `metric` (ties: the later one);
    the newest complete one when none has a score; None without any. A checkpoint's score is its
    metrics.json, else the evaluation logged at its step (`curve`, step -> value): the final
    checkpoint is written before the final evaluation when the checkpoint interval divides the
    steps, so that evaluation is only in metrics.jsonl."""
    from dis_core.loop.checkpoint import candidates  # imports torch: only when a run is read

    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    tags = candidates(root, world)
    sign = 1.0 if mode == "max" else -1.0
    scored = []
    for tag in tags:
        step = int(tag.split("_")[1])
        try:
            value = json.loads((root / tag / "metrics.json").read_text()).get(metric)
        except (OSError, ValueError):
            value = (curve or {}).get(step)
        if _is_number(value) and math.isfinite(value):
            scored.append((sign * value, step, tag))
    if scored:
        return root / max(scored)[2]
    return root / tags[0] if tags else None


def choose(results: list[RunResult | None], mode: str) -> int | None:
    """The index of the result with the best validation score (ties: the first); None if none has one."""
    best, chosen = None, None
    sign = 1.0 if mode == "max" else -1.0
    for i, r in enumerate(results):
        b = r.best(mode) if r is not None and r.status == "finished" else None
        if b is not None and (best is None or sign * b[1] > best):
            best, chosen = sign * b[1], i
    return chosen


# ---------------------------------------------------------------------------------------------
# The report


def _cost(r: RunResult) -> dict[str, Any]:
    final, info = r.run.final, r.run.info
    wall = final.get(WALL)
    return {
        "optimizer_steps": final.get(STEPS), "network_calls": final.get(CALLS), "flops": final.get(FLOPS),
        "examples": final.get(EXAMPLES), "wall_time_s": wall,
        "device_hours": wall * int(info.get("world_size") or 1) / 3600 if _is_number(wall) else None,
    }


def _mean(values: list[Any]) -> float | None:
    nums = [v for v in values if _is_number(v)]
    return statistics.fmean(nums) if nums else None


def _sum(values: list[Any]) -> float | None:
    nums = [v for v in values if _is_number(v)]
    return float(sum(nums)) if nums else None


def arm_report(arm, metric: str, mode: str, tuning: list[RunResult | None], chosen: int | None,
               seeds: dict[int, RunResult]) -> dict[str, Any]:
    """One arm: its tuning table, its chosen point, its runs there (one per seed) with collapse
    flags and test values, the interval, and costs. `arm`: the study's ArmPlan."""
    sign = 1.0 if mode == "max" else -1.0
    at_point = [r for r in seeds.values() if r.status == "finished" and r.best(mode) is not None]
    spread = statistics.stdev([r.best(mode)[1] for r in at_point]) if len(at_point) > 1 else 0.0

    def collapse(r: RunResult) -> dict[str, Any] | None:
        best, last = r.best(mode), r.last
        if best is None:
            return None
        drop = sign * (best[1] - last[1])
        return {"drop": drop, "flagged": drop > spread}

    rows = []
    for point, r in zip(arm.points, tuning):
        best = r.best(mode) if r is not None else None
        rows.append({"point": point.label, "run": r.path.name if r else None, "status": r.status if r else "missing",
                     "best_valid": best[1] if best else None, "best_step": best[0] if best else None,
                     "last_valid": r.last[1] if r is not None and r.last else None,
                     "collapse": collapse(r) if r is not None else None})
    runs = []
    for seed, r in sorted(seeds.items()):
        best = r.best(mode)
        runs.append({"seed": seed, "run": str(r.path), "status": r.status,
                     "best_valid": best[1] if best else None, "best_step": best[0] if best else None,
                     "last_valid": r.last[1] if r.last else None, "collapse": collapse(r),
                     "checkpoint": str(r.checkpoint) if r.checkpoint else None,
                     "test": r.test.get(metric) if r.test else None,
                     "test_metrics": r.test or {}, "cost": _cost(r) if r.run is not None else None})
    tested = [x["test"] for x in runs if _is_number(x["test"])]
    everything = [r for r in [*tuning, *seeds.values()] if r is not None and r.run is not None]
    unique = {r.path.resolve(): r for r in everything}.values()  # the first seed's run is in both
    info = next((r.run.info for r in unique), {})
    costs = [x["cost"] for x in runs if x["cost"]]
    params, table = info.get("params"), info.get("puzzle_table_bytes")
    edges = []
    if chosen is not None:
        for key, value in arm.points[chosen].values:
            tried = sorted({p.value(key) for p in arm.points if _is_number(p.value(key))})
            if len(tried) > 1 and _is_number(value) and value in (tried[0], tried[-1]):
                edges.append(f"{key} = {value} is the {'smallest' if value == tried[0] else 'largest'} value of the grid")
    return {
        "name": arm.arm.name, "recipe": str(arm.recipe), "grid": {k: list(v) for k, v in arm.arm.grid.items()},
        "chosen": arm.points[chosen].label if chosen is not None else None, "edges": edges, "tuning": rows,
        "spread": spread, "runs": runs, "test": t_interval(tested),
        "cost_per_run": {k: _mean([c[k] for c in costs]) for k in ("optimizer_steps", "network_calls", "flops", "examples",
                                                                    "wall_time_s", "device_hours")},
        "tuning_total": {"runs": len(list(unique)), "flops": _sum([_cost(r)["flops"] for r in unique]),
                         "device_hours": _sum([_cost(r)["device_hours"] for r in unique])},
        "eval_per_example": {"network_calls": info.get("network_calls_per_example_eval"),
                             "flops": info.get("flops_per_example_eval")},
        "params": params,
        "puzzle_table_params": table // 4 if _is_number(table) else 0,  # float32 rows
        "params_with_puzzle_table": params + (table // 4 if _is_number(table) else 0) if _is_number(params) else None,
        "curves": {str(seed): [list(p) for p in r.curve] for seed, r in sorted(seeds.items())},
    }


def paired(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of arms (first minus second, in study order), paired by seed over the seeds
    both have a test value for."""
    out = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            va = {x["seed"]: x["test"] for x in a["runs"] if _is_number(x["test"])}
            vb = {x["seed"]: x["test"] for x in b["runs"] if _is_number(x["test"])}
            common = sorted(set(va) & set(vb))
            diffs = [va[s] - vb[s] for s in common]
            out.append({"first": a["name"], "second": b["name"], "seeds": common, "differences": diffs, **t_interval(diffs)})
    return out


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "-"


def _interval(stats: dict[str, Any]) -> str:
    if stats["low"] is None:
        return "- (n < 2)" if stats["n"] else "-"
    return f"[{_num(stats['low'])}, {_num(stats['high'])}]"


def markdown(report: dict[str, Any], plot_name: str | None) -> str:
    metric, arms = report["metric"], report["arms"]
    better = "higher" if report["mode"] == "max" else "lower"
    lines = [f"# Study `{report['name']}`", ""]
    if report.get("description"):
        lines += [report["description"], ""]
    lines += [
        f"- study file: `{report['study_file']}`; command: `{report['command']}`",
        f"- metric: `{metric}` ({better} is better); seeds {', '.join(map(str, report['seeds']))}",
        f"- budget, every run: {', '.join(f'`{b}`' for b in report['budget']) or '(the recipes as they are)'}",
        "- selection on the validation split: each arm's grid point by its first seed's best validation score, "
        "each run's checkpoint by its best validation score; the test split is read once, for those checkpoints",
        f"- intervals: two-sided {LEVEL:.0%} Student t over seeds (n and n - 1 degrees of freedom as shown)",
        "",
        "## Test split, chosen checkpoints",
        "",
        f"| arm | chosen point | n | {metric} mean | 95% interval | std | per seed |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for a in arms:
        t = a["test"]
        per_seed = " / ".join(f"s{x['seed']} {_num(x['test'])}" for x in a["runs"])
        lines.append(f"| {a['name']} | {a['chosen'] or '-'} | {t['n']} | {_num(t['mean'])} | {_interval(t)} | "
                     f"{_num(t['std'])} | {per_seed} |")
    if report["paired"]:
        lines += ["", "## Paired differences (by seed)", "", "| difference | n | mean | 95% interval | per seed |",
                  "|---|---:|---:|---|---|"]
        for p in report["paired"]:
            per_seed = " / ".join(f"s{s} {d:+.3f}" for s, d in zip(p["seeds"], p["differences"]))
            lines.append(f"| {p['first']} - {p['second']} | {p['n']} | "
                         f"{'-' if p['mean'] is None else format(p['mean'], '+.3f')} | {_interval(p)} | {per_seed or '-'} |")
    lines += ["", f"## Tuning (first seed, validation split, `{metric}`)", "",
              "| arm | point | run | best (step) | last | collapse | chosen |", "|---|---|---|---:|---:|---|---|"]
    for a in arms:
        for row in a["tuning"]:
            best = f"{_num(row['best_valid'])} ({row['best_step']})" if row["best_valid"] is not None else row["status"]
            lines.append(f"| {a['name']} | {row['point']} | {row['run'] or '-'} | {best} | {_num(row['last_valid'])} | "
                         f"{_flag(row['collapse'])} | {'**yes**' if row['point'] == a['chosen'] else ''} |")
    lines += ["", "## Runs at the chosen points", "",
              "| arm | seed | best validation (step) | last validation | collapse (drop; arm spread) | test checkpoint | test |",
              "|---|---:|---:|---:|---|---|---:|"]
    for a in arms:
        for x in a["runs"]:
            best = f"{_num(x['best_valid'])} ({x['best_step']})" if x["best_valid"] is not None else x["status"]
            ckpt = Path(x["checkpoint"]).name if x["checkpoint"] else "-"
            lines.append(f"| {a['name']} | {x['seed']} | {best} | {_num(x['last_valid'])} | "
                         f"{_flag(x['collapse'])}; {_num(a['spread'])} | {ckpt} | {_num(x['test'])} |")
    lines += ["", "## Cost", "",
              "Training cost per run at the chosen point (mean over its seeds); the tuning total covers every run of "
              "the arm, the grid included. Device-hours: wall time x processes. Evaluation cost per example when "
              "every supervision step runs. Parameters of the network, and with the puzzle-embedding table.", "",
              "| arm | optimizer steps | network calls | FLOPs | examples | device-hours | tuning: runs, FLOPs, device-hours | "
              "eval calls / ex | eval FLOPs / ex | params | with puzzle table |",
              "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for a in arms:
        c, t = a["cost_per_run"], a["tuning_total"]
        lines.append(
            f"| {a['name']} | {_si(c['optimizer_steps'])} | {_si(c['network_calls'])} | {_flops(c['flops'])} | "
            f"{_si(c['examples'])} | {_num(c['device_hours'], 4)} | {t['runs']}, {_flops(t['flops'])}, "
            f"{_num(t['device_hours'], 4)} | {_si(a['eval_per_example']['network_calls'])} | "
            f"{_flops(a['eval_per_example']['flops'])} | {_si(a['params'])} | {_si(a['params_with_puzzle_table'])} |")
    notes = [f"{a['name']}: {e}; widen the grid to know the best point is inside it" for a in arms for e in a["edges"]]
    notes += [f"{a['name']}: run {x['run']} {x['status']}" for a in arms for x in a["runs"] if x["status"] != "finished"]
    notes += [f"{a['name']}: tuning run {row['run']} {row['status']}" for a in arms for row in a["tuning"]
              if row["status"] not in ("finished",)]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    lines += ["", "A run is flagged as collapsed when its last validation value is worse than its best by more than "
              "its arm's spread: the sample standard deviation of the best validation values of the arm's seeds at "
              "the chosen point (0 with a single seed, so that any drop is flagged)."]
    if plot_name:
        lines += ["", f"![validation curves and test intervals]({plot_name})"]
    return "\n".join(lines) + "\n"


def _flag(c: dict | None) -> str:
    if not c:
        return "-"
    return f"**collapsed** ({c['drop']:.3f})" if c["flagged"] else f"no ({c['drop']:.3f})"


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: each arm's validation curve at its chosen point (mean over seeds, band min-max);
    right: each arm's test mean with its 95% interval and the seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, a in enumerate(report["arms"]):
        curves = [dict(map(tuple, c)) for c in a["curves"].values() if c]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            ys = [[c[s] for c in curves] for s in steps]
            left.plot(steps, [statistics.fmean(y) for y in ys], marker="o", markersize=3, color=f"C{i}",
                      label=f"{a['name']} ({a['chosen']}, n={len(curves)})")
            left.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.2, linewidth=0)
        t = a["test"]
        seeds = [x["test"] for x in a["runs"] if _is_number(x["test"])]
        right.scatter([i] * len(seeds), seeds, s=14, color="grey", zorder=3)
        if t["mean"] is not None:
            err = [[t["mean"] - t["low"]], [t["high"] - t["mean"]]] if t["low"] is not None else None
            right.errorbar([i], [t["mean"]], yerr=err, fmt="o", capsize=6, markersize=7, zorder=4, color=f"C{i}")
    left.set_xlabel("optimizer step")
    left.set_ylabel(f"{report['metric']} (validation)")
    left.set_title("validation during training (mean, min-max over seeds)")
    left.grid(True, alpha=0.3)
    if left.lines:
        left.legend(fontsize="small")
    right.set_xticks(range(len(report["arms"])), [a["name"] for a in report["arms"]])
    right.set_xlim(-0.5, len(report["arms"]) - 0.5)
    right.set_ylabel(f"{report['metric']} (test)")
    right.set_title(f"test: mean, {LEVEL:.0%} t-interval (grey: seeds)")
    right.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(report: dict[str, Any], out: Path) -> list[Path]:
    """OUT/report.md, report.json and report.png."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "report.json", out / "report.png"]
    plot(report, paths[2])
    paths[0].write_text(markdown(report, paths[2].name), encoding="utf-8")
    paths[1].write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    return paths
