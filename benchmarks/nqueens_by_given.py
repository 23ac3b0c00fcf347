"""N-Queens valid-solution rate by number of given queens, from finished run directories.

The `nqueens` evaluator logs only totals, so this script re-runs the final evaluation: it copies
each run directory to a temporary one (the run itself is never written to), rebuilds the run's
Trainer from its `recipe.toml` with `resume=True`, which loads the newest checkpoint (the final
one), and calls `Trainer.evaluate` with an extra evaluator that records, per test board, the
number of given queens and whether the final board is a valid solution (the `nqueens`
evaluator's rule, `valid_solutions`). The recomputed overall rate is checked against the run's
summary.json.

    python benchmarks/nqueens_by_given.py runs/study/nqueens/nqueens_quick-lr3e-3-s{0,1,2} \
        runs/study/nqueens/nqueens_quick_trm-lr1e-3-s{0,1,2} [--out DIR]

Prints one Markdown table: for each number of given queens, the number of test boards, the mean
number of completions (solutions of the empty board that keep the givens), and each run's valid
rate; then one row per group of runs (the run name without its `-s<seed>` suffix) with the
mean over its seeds. With --out DIR it also writes DIR/by_given.md and DIR/by_given.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def all_solutions(n: int) -> torch.Tensor:
    """(S, n*n) bool: every solution of the empty n x n board (92 for n = 8)."""
    sols = []
    for cols in itertools.permutations(range(n)):
        if len({r - c for r, c in enumerate(cols)}) == n and len({r + c for r, c in enumerate(cols)}) == n:
            b = torch.zeros(n * n, dtype=torch.bool)
            b[[r * n + c for r, c in enumerate(cols)]] = True
            sols.append(b)
    return torch.stack(sols)


class PerBoard:
    """An evaluator (reset/update/state/compute) that keeps, per test board, the number of given
    queens and whether the final prediction is a valid solution."""

    headline = "valid_solution_rate"

    def __init__(self, n: int):
        self.n = n
        self.reset()

    def reset(self) -> None:
        self.given: list[int] = []
        self.valid: list[bool] = []
        self.completions: list[int] = []

    def update(self, record) -> None:
        from dis_core.contract.metrics import final_and_ran
        from dis_plugins.tasks.nqueens import QUEEN, valid_solutions

        x = record.batch["inputs"]
        final, _ = final_and_ran(record)
        self.valid += valid_solutions(final, x, self.n).tolist()
        given = x == QUEEN
        self.given += given.sum(-1).tolist()
        sols = self._solutions()
        # a solution completes a board when it holds every given queen
        self.completions += (~(given[:, None, :] & ~sols[None, :, :])).all(-1).sum(-1).tolist()

    def _solutions(self) -> torch.Tensor:
        if not hasattr(self, "_sols"):
            self._sols = all_solutions(self.n)
        return self._sols

    def state(self) -> dict:
        return {"given": self.given, "valid": self.valid, "completions": self.completions}

    def compute(self, states, out_dir) -> dict[str, float]:
        return {"valid_solution_rate": sum(self.valid) / max(1, len(self.valid))}


def per_board(run_dir: Path) -> dict:
    """Re-evaluate the run's final checkpoint; {"given", "valid", "completions", "rate", "logged"}."""
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe
    from dis_core.loop.trainer import Trainer

    registry = load_registry()
    with tempfile.TemporaryDirectory(prefix="nqueens_by_given-") as tmp:
        work = Path(tmp) / run_dir.name
        shutil.copytree(run_dir, work, ignore=shutil.ignore_patterns(".lock", "eval"))
        resolved = load_recipe(work / "recipe.toml", registry)
        trainer = Trainer(resolved, registry, work, resume=True)
        n = trainer.solver.spec.grid_shape[0]
        collector = PerBoard(n)
        trainer.solver.components.evaluators = {"per_board": collector}
        metrics = trainer.evaluate()
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return {**collector.state(), "rate": metrics["per_board/valid_solution_rate"],
            "logged": summary.get("nqueens/valid_solution_rate"), "step": trainer.state.step}


def group_name(run_dir: Path) -> str:
    return re.sub(r"-s\d+$", "", run_dir.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished N-Queens run directories")
    p.add_argument("--out", type=Path, default=None, help="also write by_given.md and by_given.json here")
    a = p.parse_args(argv)

    results = {}
    for run in a.runs:
        r = per_board(run)
        if r["logged"] is not None and abs(r["rate"] - r["logged"]) > 1e-9:
            print(f"warning: {run}: recomputed valid rate {r['rate']:.4f} != logged {r['logged']:.4f}", file=sys.stderr)
        print(f"{run}: step {r['step']}, valid {r['rate']:.4f} (logged {r['logged']})", file=sys.stderr)
        results[str(run)] = r

    first = next(iter(results.values()))
    ks = sorted(set(first["given"]))
    boards = {k: sum(1 for g in first["given"] if g == k) for k in ks}
    compl = {k: statistics.fmean(c for g, c in zip(first["given"], first["completions"]) if g == k) for k in ks}

    def rate(r, k):
        v = [ok for g, ok in zip(r["given"], r["valid"]) if g == k]
        return sum(v) / len(v) if v else float("nan")

    lines = ["| given queens | " + " | ".join(str(k) for k in ks) + " | all |",
             "|---|" + "---:|" * (len(ks) + 1),
             "| test boards | " + " | ".join(str(boards[k]) for k in ks) + f" | {len(first['given'])} |",
             "| completions per board (mean) | " + " | ".join(f"{compl[k]:.3g}" for k in ks) + " | |"]
    groups: dict[str, list[dict]] = {}
    for run, r in results.items():
        groups.setdefault(group_name(Path(run)), []).append(r)
    for name, rs in groups.items():
        cells = [statistics.fmean(rate(r, k) for r in rs) for k in ks]
        lines.append(f"| {name} (mean of {len(rs)}) | " + " | ".join(f"{c:.2f}" for c in cells)
                     + f" | {statistics.fmean(r['rate'] for r in rs):.3f} |")
    for run, r in results.items():
        lines.append(f"| {Path(run).name} | " + " | ".join(f"{rate(r, k):.2f}" for k in ks) + f" | {r['rate']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "by_given.md").write_text(text)
        (a.out / "by_given.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
