"""Run a small TRM-vs-DIS study and summarise it: recipe x learning rate x seed.

Protocol (issue 8, "Re-measure what was published"): every arm (recipe) gets the same tuning
budget, a learning-rate sweep on seed 0; the lr with the best final headline metric on the test
split (ties: the smaller lr) is then run with the remaining seeds. The summary reports each arm at
its best lr as mean ± sample standard deviation over the seeds, with the training cost (optimizer
steps, network calls, FLOPs, examples) and the evaluation cost per test example.

    python benchmarks/study.py nqueens      --out runs/study/nqueens/report
    python benchmarks/study.py sudoku       --out runs/study/sudoku/report
    python benchmarks/study.py solver_edits --out runs/study/solver_edits/report   # after nqueens
    python benchmarks/study.py nqueens --report-only --out DIR   # summarise, train nothing
    python benchmarks/study.py custom --recipe recipes/a.toml --recipe recipes/b.toml \
        --lr 1e-3 --lr 3e-3 --root runs/study/mine --out runs/study/mine/report

Runs go to ROOT/<recipe stem>-lr<lr>-s<seed> (ROOT defaults to runs/study/<study>); a run with a
summary.json is skipped, an unfinished one is moved aside to <dir>.incomplete-<time> and rerun.
At most --workers trainings run at once (default 2), each with train.threads = --threads
(default 1), which is what a shared 2-core machine can take. The summary goes only to --out
(summary.md, summary.json, and `dis compare` outputs in compare/ and compare_all/); it never
writes into docs/.

Presets:
  nqueens       recipes/nqueens_quick.toml, recipes/nqueens_quick_trm.toml; lr 1e-3, 3e-3, 1e-2
  sudoku        recipes/sudoku_quick.toml, recipes/sudoku_quick_trm.toml; lr 3e-4, 1e-3, 3e-3
  solver_edits  recipes/nqueens_solver_edits.toml at the best lr of nqueens_quick in the nqueens
                study (no sweep of its own: it is a variant of that recipe, compared at equal
                settings), seeds 0-2, against the nqueens_quick runs at that lr
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DIS_RUN = str(BIN / "dis-run") if (BIN / "dis-run").exists() else "dis-run"
DIS = str(BIN / "dis") if (BIN / "dis").exists() else "dis"

PRESETS = {
    "nqueens": {"recipes": ["recipes/nqueens_quick.toml", "recipes/nqueens_quick_trm.toml"], "lrs": ["1e-3", "3e-3", "1e-2"]},
    "sudoku": {"recipes": ["recipes/sudoku_quick.toml", "recipes/sudoku_quick_trm.toml"], "lrs": ["3e-4", "1e-3", "3e-3"]},
}


def run_name(recipe: str, lr: str, seed: int) -> str:
    return f"{Path(recipe).stem}-lr{lr}-s{seed}"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def train(recipe: str, lr: str, seed: int, root: Path, threads: int, extra: list[str], dry: bool) -> Path:
    out = root / run_name(recipe, lr, seed)
    if finished(out):
        return out
    cmd = [DIS_RUN, recipe, "--set", f"train.threads={threads}", "--set", f"train.optimizer.config.lr={lr}",
           "--set", f"train.seed={seed}", *[a for s in extra for a in ("--set", s)], "--out", str(out)]
    print(("would run: " if dry else "run: ") + " ".join(cmd), flush=True)
    if dry:
        return out
    if out.exists():  # killed earlier: keep it for inspection, start over
        aside = out.with_name(out.name + time.strftime(".incomplete-%Y%m%d-%H%M%S"))
        out.rename(aside)
        print(f"moved unfinished {out} to {aside}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with open(root / f"{out.name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    (root / f"{out.name}.load.json").write_text(json.dumps({"loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rc": rc}))
    if rc != 0:
        print(f"FAILED ({rc}): {out}; see {root / (out.name + '.log')}", flush=True)
    return out


def run_all(jobs: list[tuple], workers: int, threads: int, extra: list[str], dry: bool) -> None:
    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for f in [pool.submit(train, r, lr, s, root, threads, extra, dry) for r, lr, s, root in jobs]:
            f.result()


# ----------------------------------------------------------------------------- reading runs


def headline(run_dir: Path) -> str:
    names = read_json(run_dir / "run.json").get("headline_metrics") or []
    return names[0] if names else "nqueens/valid_solution_rate"


def final(run_dir: Path) -> dict:
    return read_json(run_dir / "summary.json")


def best_lr(recipe: str, lrs: list[str], root: Path) -> str | None:
    """The lr whose seed-0 run has the highest final headline metric (ties: the first listed)."""
    best, best_v = None, None
    for lr in lrs:
        d = root / run_name(recipe, lr, 0)
        v = final(d).get(headline(d)) if finished(d) else None
        if v is not None and (best_v is None or v > best_v):
            best, best_v = lr, v
    return best


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_ms(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def eval_curve(run_dir: Path, metric: str) -> dict[int, float]:
    curve = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return curve
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("split") == "eval" and metric in row:
            curve[int(row["step"])] = float(row[metric])
    return curve


def last_train(run_dir: Path, key: str) -> float | None:
    """The value of `key` in the last training row of metrics.jsonl that has it."""
    value = None
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("split") == "train" and key in row:
            value = float(row[key])
    return value


def short(x: float | None) -> str:
    if x is None:
        return "-"
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def arm_summary(recipe: str, lr: str, seeds: list[int], root: Path) -> dict:
    dirs = [root / run_name(recipe, lr, s) for s in seeds]
    dirs = [d for d in dirs if finished(d)]
    if not dirs:
        return {"recipe": recipe, "lr": lr, "n": 0}
    metric = headline(dirs[0])
    second = "exact/exact_accuracy"
    finals = [final(d) for d in dirs]
    info = read_json(dirs[0] / "run.json")
    vals = [f[metric] for f in finals if metric in f]
    exact = [f[second] for f in finals if second in f]
    ex = [f.get("cost/examples") for f in finals if f.get("cost/examples") is not None]
    curves = [eval_curve(d, metric) for d in dirs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return {
        "recipe": recipe, "lr": lr, "n": len(dirs), "runs": [str(d) for d in dirs],
        "seeds": [read_json(d / "run.json").get("recipe", {}).get("train", {}).get("seed") for d in dirs],
        "metric": metric, "values": vals, "mean": mean_std(vals)[0], "std": mean_std(vals)[1],
        "exact_values": exact,
        "optimizer_steps": finals[0].get("cost/optimizer_steps"),
        "train_network_calls": finals[0].get("cost/network_calls"),
        "train_flops": finals[0].get("cost/flops"),
        "examples": ex,
        "eval_calls_per_example": info.get("network_calls_per_example_eval"),
        "eval_flops_per_example": info.get("flops_per_example_eval"),
        "train_calls_per_example_max": info.get("network_calls_per_example_train"),
        "wall_s": [f.get("cost/wall_time_s") for f in finals],
        # supervision steps of the examples that finished in the last logging window (ACT: learned)
        "final_train_steps": [v for d in dirs if (v := last_train(d, "train/steps")) is not None],
        "curve": {s: statistics.fmean(c[s] for c in curves) for s in steps},
    }


def report(recipes: list[str], lrs_of: dict[str, list[str]], roots: dict[str, Path], seeds: list[int], out: Path) -> str:
    lines = []
    # the sweep
    all_lrs = sorted({lr for r in recipes for lr in lrs_of[r]}, key=float)
    if any(len(lrs_of[r]) > 1 for r in recipes):
        lines += ["## Learning-rate sweep (seed 0, final evaluation, test split)", "",
                  "| arm | " + " | ".join(f"lr {lr}" for lr in all_lrs) + " | best |",
                  "|---|" + "---:|" * (len(all_lrs) + 1)]
        for r in recipes:
            cells = []
            for lr in all_lrs:
                d = roots[r] / run_name(r, lr, 0)
                v = final(d).get(headline(d)) if finished(d) else None
                cells.append("-" if v is None else f"{v:.3f}")
            lines.append(f"| {Path(r).stem} | " + " | ".join(cells) + f" | {best_lr(r, lrs_of[r], roots[r]) or '-'} |")
        lines.append("")
    # each arm at its best lr
    arms = []
    for r in recipes:
        lr = best_lr(r, lrs_of[r], roots[r])
        if lr is not None:
            arms.append(arm_summary(r, lr, seeds, roots[r]))
    if arms:
        metric = arms[0].get("metric", "metric")
        lines += [f"## Each arm at its best lr (seeds {', '.join(map(str, seeds))})", "",
                  f"| arm | lr | n | {metric} mean ± std | per seed | exact/exact_accuracy mean ± std | "
                  "optimizer steps | training network calls | training FLOPs | examples consumed (mean, min-max) | "
                  "supervision steps per example at the end of training | "
                  "eval network calls / test example | eval FLOPs / test example | wall s per run (mean, under load) |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for a in arms:
            if not a["n"]:
                lines.append(f"| {Path(a['recipe']).stem} | {a['lr']} | 0 |" + " - |" * 11)
                continue
            ex = a["examples"]
            exs = f"{statistics.fmean(ex):,.0f} ({min(ex):,.0f}-{max(ex):,.0f})" if ex else "-"
            walls = [w for w in a["wall_s"] if w is not None]
            wall = f"{statistics.fmean(walls):.0f}" if walls else "-"
            lines.append(
                f"| {Path(a['recipe']).stem} | {a['lr']} | {a['n']} | {fmt_ms(a['values'])} | "
                f"{' / '.join(f'{v:.3f}' for v in a['values'])} | {fmt_ms(a['exact_values'])} | "
                f"{a['optimizer_steps']:,.0f} | {short(a['train_network_calls'])} | {a['train_flops']:.3g} | {exs} | "
                f"{fmt_ms(a['final_train_steps'], 1)} | "
                f"{a['eval_calls_per_example']} | {short(a['eval_flops_per_example'])} | "
                f"{wall} |"
            )
        steps = sorted(set().union(*(a.get("curve", {}).keys() for a in arms)))
        if steps:
            lines += ["", f"## {metric} during training (mean over the seeds at the best lr)", "",
                      "| arm | " + " | ".join(f"step {s}" for s in steps) + " |",
                      "|---|" + "---:|" * len(steps)]
            for a in arms:
                c = a.get("curve", {})
                lines.append(f"| {Path(a['recipe']).stem} | " + " | ".join("-" if s not in c else f"{c[s]:.3f}" for s in steps) + " |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"arms": arms, "seeds": seeds}, indent=1, default=str))
    # dis compare: the best-lr runs (seeds pooled per recipe), and every run of the study
    best_runs = [d for a in arms for d in a.get("runs", [])]
    all_runs = sorted({str(p) for r in recipes for lr in lrs_of[r] for s in seeds
                       for p in [roots[r] / run_name(r, lr, s)] if finished(p)})
    for name, runs in (("compare", best_runs), ("compare_all", all_runs)):
        if runs:
            res = subprocess.run([DIS, "compare", *runs, "--out", str(out / name)], cwd=REPO, capture_output=True, text=True)
            if res.returncode:
                print(f"dis compare ({name}) failed: {res.stderr.strip()[-500:]}", file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=[*PRESETS, "solver_edits", "custom"])
    p.add_argument("--out", type=Path, required=True, help="directory for summary.md/json and the dis compare outputs")
    p.add_argument("--root", type=Path, default=None, help="run directories (default runs/study/<study>)")
    p.add_argument("--recipe", action="append", default=None, help="custom: a recipe (repeat)")
    p.add_argument("--lr", action="append", default=None, help="learning rates to sweep on seed 0 (repeat; as written, e.g. 3e-3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2, help="trainings at once (default 2)")
    p.add_argument("--threads", type=int, default=1, help="train.threads of every run (default 1)")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra KEY=VALUE for every run")
    p.add_argument("--nqueens-root", type=Path, default=Path("runs/study/nqueens"), help="solver_edits: where the nqueens study ran")
    p.add_argument("--report-only", action="store_true", help="train nothing, summarise what is there")
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run")
    a = p.parse_args(argv)
    os.chdir(REPO)
    if a.out.resolve().is_relative_to((REPO / "docs").resolve()):
        p.error("--out must not be under docs/: the results documents are written by hand from its output")

    root = a.root or Path("runs/study") / a.study
    if a.study in PRESETS:
        recipes, lrs = PRESETS[a.study]["recipes"], a.lr or PRESETS[a.study]["lrs"]
        lrs_of, roots = {r: lrs for r in recipes}, {r: root for r in recipes}
    elif a.study == "custom":
        if not a.recipe or not a.lr:
            p.error("custom needs --recipe and --lr")
        recipes, lrs_of, roots = a.recipe, {r: a.lr for r in a.recipe}, {r: root for r in a.recipe}
    else:  # solver_edits, at nqueens_quick's best lr from the nqueens study
        base = "recipes/nqueens_quick.toml"
        lr = best_lr(base, PRESETS["nqueens"]["lrs"], a.nqueens_root)
        if lr is None:
            p.error(f"solver_edits: no finished nqueens_quick seed-0 runs under {a.nqueens_root}; run the nqueens study first")
        print(f"solver_edits at nqueens_quick's best lr {lr}")
        recipes = [base, "recipes/nqueens_solver_edits.toml"]
        lrs_of = {r: [lr] for r in recipes}
        roots = {base: a.nqueens_root, recipes[1]: root}

    if not a.report_only:
        trained = [r for r in recipes if not (a.study == "solver_edits" and r == "recipes/nqueens_quick.toml")]
        # phase 1: the sweep on the first seed; phase 2: the other seeds at each arm's best lr
        run_all([(r, lr, a.seeds[0], roots[r]) for r in trained for lr in lrs_of[r]], a.workers, a.threads, a.extra, a.dry_run)
        phase2 = []
        for r in trained:
            lr = best_lr(r, lrs_of[r], roots[r]) or (lrs_of[r][0] if a.dry_run else None)
            if lr is None:
                print(f"{r}: no finished seed-{a.seeds[0]} run, skipping its other seeds", file=sys.stderr)
                continue
            phase2 += [(r, lr, s, roots[r]) for s in a.seeds[1:]]
        run_all(phase2, a.workers, a.threads, a.extra, a.dry_run)
        if a.dry_run:
            return 0
    print(report(recipes, lrs_of, roots, a.seeds, a.out))
    print(f"written: {a.out}/summary.md, summary.json, compare/, compare_all/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
