"""Where an evaluation batch spends its time, op by op: torch.profiler over evaluation rollouts of a
recipe's test split, as `dis eval` runs them (inference mode, every supervision step, the recipe's
precision). Figures, not asserts; compare shares, not milliseconds, on a shared machine.

    python benchmarks/profile_eval.py recipes/arc1_compact.toml --batches 2 --batch-size 32 \\
        --set task.config.num_augmentations=8 --set train.preflight=false

(`num_augmentations = 8` builds ARC's data in seconds; the shapes, hence the time per example, are
those of the 1000-variant split.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batches", type=int, default=2, help="profiled batches, after one warm-up batch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    args = ap.parse_args()

    from dis_core.step.data import fetch
    from dis_core.step.solver import Solver
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe

    torch.set_num_threads(args.threads)
    registry = load_registry()
    resolved = load_recipe(args.recipe, registry, args.overrides)
    solver = Solver.build(resolved, registry, args.data_dir)
    test_set = solver.dataset("test")
    size = args.batch_size

    def batch(i: int):
        return fetch(test_set, np.arange(i * size, (i + 1) * size) % len(test_set), solver.device)

    with solver.evaluating(), torch.inference_mode():
        solver.rollout(batch(0))  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for i in range(1, args.batches + 1):
                solver.rollout(batch(i))
            seconds = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    print(f"{args.recipe}: precision {solver.precision}, {args.threads} threads, {args.batches} batch(es) of {size}, "
          f"{solver.halting.max_steps} steps each: {args.batches * size / seconds:.2f} examples / s under the profiler; "
          f"load {os.getloadavg()[0]:.2f}")
    for e in events[:args.rows]:
        print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.self_cpu_time_total / 1e3 / args.batches:8.1f} ms a batch  "
              f"x{e.count // args.batches:<5d} {e.key[:90]}")


if __name__ == "__main__":
    sys.exit(main())
