"""Does `train.compile` pay for the runs a recipe describes? Warm-up against gain per step.

For each recipe, two fresh processes (compile state is per process) train the recipe's own model
on its own data: one eager, one with `train.compile = true`. Each times its first steps one by one
(the compiled one's first steps include inductor's compilation and any recompiles) and then the
median of steady steps. Printed per recipe: the warm-up (extra seconds of the first steps over
the steady pace), the steady step times, the break-even step count (warm-up / gain per step),
and the recipe's own step count, so the verdict is "pays after N of its M steps" or "never".

    python benchmarks/bench_compile.py recipes/nqueens_quick.toml recipes/sudoku_quick.toml recipes/arc1_cpu.toml

Figures, not asserts: run it on an otherwise idle machine and compare within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(recipe: str, compile_: bool, first: int, steady: int, threads: int, sets: list[str]) -> dict:
    """In this process: the per-step times of the first `first` steps and `steady` more."""
    import torch

    from dis_core.loop.trainer import Trainer
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe

    registry = load_registry()
    overrides = [f"train.compile={'true' if compile_ else 'false'}", f"train.threads={threads}", "train.preflight=false",
                 "loggers=[]", *sets]
    resolved = load_recipe(Path(recipe), registry, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(resolved, registry, Path(tmp) / "run", data_dir=Path("data"))
        times = []
        for _ in range(first + steady):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
    return {"first": times[:first], "steady": statistics.median(times[first:]), "threads": torch.get_num_threads(),
            "steps": trainer.total_steps, "precision": trainer.solver.precision}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="*")
    p.add_argument("--first", type=int, default=5, help="steps timed one by one from the start")
    p.add_argument("--steady", type=int, default=15, help="steps after those, their median is the steady pace")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="sets", action="append", default=[], help="a recipe override for every run")
    p.add_argument("--child", nargs=2, metavar=("RECIPE", "COMPILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1] == "1", args.first, args.steady, args.threads, args.sets)))
        return
    print(f"{'recipe':<28} {'eager s/step':>12} {'compiled':>10} {'gain':>6} {'warm-up s':>10} {'break-even':>11} {'recipe steps':>12}")
    for recipe in args.recipes:
        res = {}
        for c in (0, 1):
            cmd = [sys.executable, __file__, "--child", recipe, str(c), "--first", str(args.first), "--steady",
                   str(args.steady), "--threads", str(args.threads), *(a for s in args.sets for a in ("--set", s))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{recipe} (compile={c}) failed:\n{out.stderr[-2000:]}")
            res[c] = json.loads(out.stdout.strip().splitlines()[-1])
        eager, comp = res[0]["steady"], res[1]["steady"]
        # The compiled run's extra time in its first steps over its own steady pace, less the eager
        # run's (the first steps of any run are slower: allocator, caches, lazy initialisation).
        warm = (sum(res[1]["first"]) - args.first * comp) - (sum(res[0]["first"]) - args.first * eager)
        gain = eager - comp
        steps = res[0]["steps"]
        even = warm / gain if gain > 0 else float("inf")
        verdict = f"{even:,.0f}" if gain > 0 else "never"
        print(f"{Path(recipe).name:<28} {eager:>12.4f} {comp:>10.4f} {eager / comp:>5.2f}x {warm:>10.1f} {verdict:>11} "
              f"{steps:>12,}   ({res[0]['precision']}, {res[0]['threads']} threads)")


if __name__ == "__main__":
    main()
