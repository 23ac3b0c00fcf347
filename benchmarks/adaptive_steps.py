"""Accuracy against mean network calls per example for adaptive stopping rules at evaluation
(issue 11: the DIS paper's future work), on finished runs' checkpoints: nothing is trained.

Each run's newest checkpoint is evaluated on its whole test split, one thread, once per rule:
  fixed        every example runs n_sup steps (what DIS and TRM's code do)
  truncate@s   every example stops after s steps (from the plain evaluation's per-step metrics)
  stable k     `fixed` with eval_halt = "stable", patience k: stop once the answer has not changed
               for k steps in a row
  confident t  eval_halt = "confident", threshold t: stop once the mean top-class probability >= t
  q_head       eval_halt = "q_head": stop once q_halt > 0 (runs whose Q-head was trained: TRM's
               `act`, or DIS with halting.config.q_head = true)
Every rule is `dis_core.load(run, ...).with_overrides([...]).evaluate()` with
`halting.name=fixed`, `halting.config.eval_halt=...` overrides (what `dis eval RUN --set ...`
does), so the numbers are the `diagnostics/mean_steps`, `diagnostics/calls_per_example` and
evaluator metrics of any run. The plain evaluation also gives the Advantage Margin per step (`diagnostics/*@s`).

    python benchmarks/adaptive_steps.py runs/study/nqueens/nqueens_quick-lr3e-3-s0 \\
        runs/study/nqueens/nqueens_quick_trm-lr3e-3-s0 --out runs/adaptive_steps/nqueens

writes --out/results.json (a row per run and rule), --out/table.md, --out/adaptive_steps.png and
--out/guidance_margin.png;
it refuses an --out that already holds results.json unless --force, and never writes into docs/
(copy the figure there yourself).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STABLE = (1, 2, 3)
CONFIDENT = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
GUIDANCE = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # scored on the `fixed` rule's evaluation, in the same pass


def headline(metrics: dict[str, float]) -> str:
    for key in ("nqueens/valid_solution_rate", "sudoku/valid_solution_rate", "maze/valid_path_rate", "exact/exact_accuracy"):
        if key in metrics:
            return key
    raise SystemExit("no headline metric among the evaluation's keys")


def rules(recipe) -> list[tuple[str, list[str]]]:
    fixed = ["halting.name=fixed"]
    out = [("fixed", fixed + [f"eval.guidance={list(GUIDANCE)}"])]
    out += [(f"stable k={k}", fixed + ["halting.config.eval_halt=stable", f"halting.config.patience={k}"]) for k in STABLE]
    out += [(f"confident t={t:g}", fixed + ["halting.config.eval_halt=confident", f"halting.config.threshold={t}"]) for t in CONFIDENT]
    trained_head = recipe.halting.name == "act" or (recipe.halting.name == "fixed" and recipe.halting.config.get("q_head", False))
    if trained_head:
        out.append(("q_head", fixed + ["halting.config.q_head=true", "halting.config.eval_halt=q_head"]))
    return out


def method(recipe) -> str:
    if recipe.halting.name == "act":
        return "TRM"
    return "DIS + Q-head" if recipe.halting.config.get("q_head", False) else "DIS"


def evaluate_run(run: Path, registry, data_dir: Path) -> list[dict]:
    import dis_core

    model = dis_core.load(run, data_dir=data_dir, device="cpu", registry=registry)
    rows = []
    for name, overrides in rules(model.recipe):
        t0 = time.perf_counter()
        m = model.with_overrides(overrides).evaluate()
        key = headline(m)
        row = {"run": run.name, "method": method(model.recipe), "rule": name, "metric": key, "accuracy": m[key],
               "mean_steps": m["diagnostics/mean_steps"], "calls_per_example": m["diagnostics/calls_per_example"],
               "seconds": round(time.perf_counter() - t0, 2)}
        if name == "fixed":
            row["per_step"] = {k: v for k, v in m.items() if "@" in k and "@w=" not in k}
            row["guidance"] = {f"{w:g}": m[f"{key}@w={w:g}"] for w in GUIDANCE}
            row["margin"] = {k: m[k] for k in ("diagnostics/advantage_margin", "diagnostics/margin_positive",
                                               "diagnostics/margin_negative") if k in m}
            calls = m["diagnostics/calls_per_example"] / m["diagnostics/mean_steps"]
            prefix = key.split("/")[0]
            step_key = "valid" if prefix in ("nqueens", "sudoku") else None
            for s in range(1, int(m["diagnostics/mean_steps"]) + 1):
                acc = m.get(f"{prefix}/{step_key}@{s}") if step_key else None
                if acc is not None and s < m["diagnostics/mean_steps"]:
                    rows.append({"run": run.name, "method": row["method"], "rule": f"truncate@{s}", "metric": key,
                                 "accuracy": acc, "mean_steps": float(s), "calls_per_example": s * calls, "seconds": 0.0})
        rows.append(row)
        print(f"{run.name:40s} {name:18s} {key} {m[key]:.3f}  steps {row['mean_steps']:.2f}  calls {row['calls_per_example']:.1f}"
              f"  ({row['seconds']:.1f}s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run | method | rule | accuracy | mean steps | calls / example |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {r['rule']} | {r['accuracy']:.3f} | {r['mean_steps']:.2f} | {r['calls_per_example']:.1f} |")
    full = [r for r in rows if r["rule"] == "fixed"]
    lines += ["", "Guidance scale w (fixed n_sup steps): " + full[0]["metric"], "",
              "| run | " + " | ".join(f"w={w:g}" for w in GUIDANCE) + " |", "|---|" + "---|" * len(GUIDANCE)]
    lines += [f"| {r['run']} | " + " | ".join(f"{r['guidance'][f'{w:g}']:.3f}" for w in GUIDANCE) + " |" for r in full]
    steps = max(int(r["mean_steps"]) for r in full)
    lines += ["", "Advantage Margin per step: mean over supervised cells (share > 1e-6 / share < -1e-6)", "",
              "| run | " + " | ".join(f"s={s}" for s in range(1, steps + 1)) + " | all |", "|---|" + "---|" * (steps + 1)]
    for r in full:
        cells = []
        for s in range(1, steps + 1):
            m, p = r["per_step"].get(f"diagnostics/advantage_margin@{s}"), r["per_step"].get(f"diagnostics/margin_positive@{s}")
            n = r["per_step"].get(f"diagnostics/margin_negative@{s}")
            cells.append("" if m is None else f"{m:+.3f} ({p:.3f} / {n:.3f})")
        mm = r["margin"]
        cells.append(f"{mm['diagnostics/advantage_margin']:+.3f} ({mm['diagnostics/margin_positive']:.3f} / "
                     f"{mm['diagnostics/margin_negative']:.3f})" if mm else "")
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    cols = min(3, len(runs))
    nrows = -(-len(runs) // cols)
    fig, grid = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False, sharey=True)
    axes = [list(grid.flat)]
    for ax in axes[0][len(runs):]:
        ax.set_visible(False)
    families = [("truncate@", "fixed budget (truncate)", "k", "o"), ("stable", "stable k", "tab:blue", "s"),
                ("confident", "confident t", "tab:orange", "^"), ("q_head", "Q-head", "tab:green", "D"),
                ("fixed", "fixed n_sup", "tab:red", "*")]
    for ax, run in zip(axes[0], runs):
        mine = [r for r in rows if r["run"] == run]
        for prefix, label, color, marker in families:
            pts = sorted(((r["calls_per_example"], r["accuracy"], r["rule"]) for r in mine if r["rule"].startswith(prefix)))
            if prefix == "truncate@":
                full = [r for r in mine if r["rule"] == "fixed"]
                pts += [(r["calls_per_example"], r["accuracy"], r["rule"]) for r in full]
            if not pts:
                continue
            xs, ys, names = zip(*pts)
            style = "-" if prefix == "truncate@" else ("" if prefix in ("fixed", "q_head") else "--")
            ax.plot(xs, ys, style, marker=marker, color=color, label=label, markersize=9 if prefix == "fixed" else 5)
            if prefix in ("stable", "confident"):
                for x, y, n in pts:
                    ax.annotate(n.split()[-1], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=color)
        ax.set_title(f"{run} ({mine[0]['method']})", fontsize=9)
        ax.set_xlabel("mean network calls per test example")
        ax.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel(rows[0]["metric"])
    axes[0][len(runs) - 1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_guidance_margin(rows: list[dict], path: Path) -> None:
    """Left: the Advantage Margin per step (mean over supervised cells); right: the headline
    metric against the guidance scale w, both from each run's `fixed` evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["rule"] == "fixed"]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in full:
        label = f"{r['method']} ({r['run']})"
        steps = range(1, int(r["mean_steps"]) + 1)
        m = [r["per_step"].get(f"diagnostics/advantage_margin@{s}") for s in steps]
        pos = [r["per_step"].get(f"diagnostics/margin_positive@{s}") for s in steps]
        neg = [r["per_step"].get(f"diagnostics/margin_negative@{s}") for s in steps]
        if None not in m:
            (line,) = left.plot(list(steps), m, marker="o", label=label)
            mid.plot(list(steps), pos, marker="^", color=line.get_color(), label=f"{r['method']}: positive")
            mid.plot(list(steps), neg, marker="v", linestyle="--", color=line.get_color(), label=f"{r['method']}: negative")
        ws = sorted(float(w) for w in r["guidance"])
        right.plot(ws, [r["guidance"][f"{w:g}"] for w in ws], marker="o", label=label)
    left.axhline(0.0, color="k", linewidth=0.8)
    left.set_yscale("symlog", linthresh=0.01)
    left.set(xlabel="supervision step s", ylabel="diagnostics/advantage_margin@s (symlog)", title="Advantage Margin per step (Prop. 4.1)")
    mid.set(xlabel="supervision step s", ylabel="share of supervised cells", title="margin > 1e-6 (solid), < -1e-6 (dashed)")
    right.set(xlabel="guidance scale w (Eq. 5)", ylabel=full[0]["metric"], title="answers from l_w at every step")
    for ax in (left, mid, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    mid.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run directories (recipe.toml + checkpoints/)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, table.md, adaptive_steps.png")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data")
    p.add_argument("--force", action="store_true", help="replace an earlier results.json in --out")
    args = p.parse_args(argv)
    if (args.out / "results.json").exists() and not args.force:
        print(f"{args.out / 'results.json'} exists; pass --force to replace it", file=sys.stderr)
        return 2
    if (ROOT / "docs") in args.out.resolve().parents or args.out.resolve() == ROOT / "docs":
        print("--out must not be under docs/ (copy the figure there yourself)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    from dis_core.wiring.plugins import load_registry

    registry = load_registry()
    rows = []
    for run in args.runs:
        rows += evaluate_run(run, registry, args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "table.md").write_text(table(rows))
    plot(rows, args.out / "adaptive_steps.png")
    plot_guidance_margin(rows, args.out / "guidance_margin.png")
    print(f"wrote {args.out}/results.json, table.md, adaptive_steps.png, guidance_margin.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
