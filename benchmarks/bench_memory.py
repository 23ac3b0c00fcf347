"""Peak memory and step time of a training supervision step with and without
`train.activation_checkpointing`, through dis's own `Trainer.train_step` (DeepSpeed engine, carry,
refills, loss, AdamW) on random data of the config's shapes.

Memory: each configuration runs in a fresh process, which reports its peak resident memory
(ru_maxrss) and its resident memory once built, before the first step; their difference is what
the steps add (activations kept for the backward, gradients, AdamW's moments). Time: one more
process trains one model and switches the recomputation on and off step by step, so that the machine's noise hits both alike; the ratios of the medians of wall time
and of the process's CPU time are printed (CPU time is the steadier on a shared machine).

    .venv/bin/python benchmarks/bench_memory.py --config b --T 3 --n 6
    .venv/bin/python benchmarks/bench_memory.py --config arc1_compact --batch 64

Configs: b = D256, 1 layer, 8 heads, L 900 + 16 prefix positions, batch 8 (bench_vs_official.py);
arc1_compact = the same backbone (recipes/arc1_compact.toml: T 1, n 2), at the micro-batch given
(the memory of a step depends on the micro-batch, not on the global batch it accumulates to).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import numpy as np

from dis_core import hookimpl

CONFIGS = {
    "b": dict(hidden=256, layers=1, heads=8, seq=900, prefix=16, batch=8, vocab=12, T=1, n=2),
    "arc1_compact": dict(hidden=256, layers=1, heads=8, seq=900, prefix=16, batch=64, vocab=12, T=1, n=2),
}
N_SUP = 6


@attrs.frozen
class _NoOptions:
    pass


class RandomTask:
    """A task of random tokens with the config's vocabulary, length and puzzle ids."""

    __name__ = "bench_memory_random"

    def __init__(self, c: dict):
        self.c = c

    @hookimpl
    def register_tasks(self, register):
        from dis_core.contract.interfaces import TaskSpec

        c = self.c

        class Split:
            def __len__(self):
                return 4096

            def get(self, idx):
                rng = np.random.default_rng(int(idx[0]))
                B, L, V = len(idx), c["seq"], c["vocab"]
                return {"inputs": rng.integers(0, V, (B, L)).astype(np.int32), "labels": rng.integers(0, V, (B, L)).astype(np.int32),
                        "puzzle_ids": rng.integers(0, 8, B).astype(np.int32), "example_ids": np.asarray(idx, dtype=np.int64)}

        class Task:
            spec = TaskSpec(vocab_size=c["vocab"], seq_len=c["seq"], num_puzzle_ids=8)

            def dataset(self, split):
                return Split()

        register("bench_memory_random", _NoOptions, lambda config, ctx: Task())


def trainer_for(c: dict, *, precision: str, checkpointing: bool, threads: int, workdir: Path):
    from dis_core.loop.trainer import Trainer
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe

    registry = load_registry(extra_plugins=(RandomTask(c),))
    recipe = workdir / "bench_memory.toml"
    recipe.write_text(f"""
[task]
name = "bench_memory_random"
[backbone]
name = "trm"
config = {{ hidden_size = {c['hidden']}, num_layers = {c['layers']}, num_heads = {c['heads']}, T = {c['T']}, n = {c['n']}, step_embedding = true, puzzle_emb_ndim = {c['hidden']}, puzzle_emb_len = {c['prefix']} }}
[targets]
name = "reveal_path"
[halting]
name = "fixed"
[supervision]
n_sup = {N_SUP}
[train]
global_batch_size = {c['batch']}
steps = 1000000
precision = "{precision}"
threads = {threads}
activation_checkpointing = {str(checkpointing).lower()}
preflight = false  # its probe step would add its own peak and time
[train.optimizer]
name = "adamw"
config = {{ lr = 1e-4 }}
""")
    return Trainer(load_recipe(recipe, registry), registry, workdir / "run", data_dir=workdir / "data")


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 2**20


def child(args, c: dict) -> None:
    """One configuration in this (fresh) process: JSON with its memory and step times."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(c, precision=args.precision, checkpointing=args.checkpointing == "on", threads=args.threads,
                              workdir=Path(tmp))
        built = _rss_gib()
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            trainer.train_step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        print(json.dumps({"built_gib": built, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                          "precision": trainer.solver.precision, "step_s": statistics.median(times)}))


def timing(args, c: dict) -> dict[str, dict[bool, float]]:
    """Both settings in one process on one model, switched every step (in the order off, on, then
    on, off: drift hits both alike): medians of wall time and of the process's CPU time."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(c, precision=args.precision, checkpointing=False, threads=args.threads, workdir=Path(tmp))
        backbone = trainer.solver.backbone
        for _ in range(args.warmup):
            trainer.train_step()
        wall: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.rounds * args.steps):
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                backbone.activation_checkpointing = on
                t0, c0 = time.perf_counter(), time.process_time()
                trainer.train_step()
                wall[on].append(time.perf_counter() - t0)
                cpu[on].append(time.process_time() - c0)
        return {"wall": {k: statistics.median(v) for k, v in wall.items()},
                "cpu": {k: statistics.median(v) for k, v in cpu.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="b")
    ap.add_argument("--T", type=int, default=None, help="cycles per supervision step (default: the config's)")
    ap.add_argument("--n", type=int, default=None, help="z-updates per cycle (default: the config's)")
    ap.add_argument("--batch", type=int, default=None, help="slots per forward (default: the config's)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process (memory) or per round (time)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of --steps steps per setting in the time measurement; 0 = memory only")
    ap.add_argument("--settings", default="off,on", help="which to measure: off,on (default), or one of them alone "
                    "(a batch that only fits with recomputation)")
    ap.add_argument("--checkpointing", choices=("on", "off"), help=argparse.SUPPRESS)  # a child's setting
    args = ap.parse_args()
    c = dict(CONFIGS[args.config])
    c.update({k: v for k, v in (("T", args.T), ("n", args.n), ("batch", args.batch)) if v is not None})
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.checkpointing:
        import torch

        torch.set_num_threads(args.threads)
        child(args, c)
        return
    shape = (f"{args.config}: D{c['hidden']}, {c['layers']} layer(s), {c['heads']} heads, L {c['seq']} + {c['prefix']} prefix, "
             f"batch {c['batch']}, T {c['T']}, n {c['n']}, {args.precision}, {args.threads} threads")
    print(shape)
    base = [sys.executable, __file__, "--config", args.config, "--T", str(c["T"]), "--n", str(c["n"]), "--batch", str(c["batch"]),
            "--precision", args.precision, "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    rows = {}
    for setting in args.settings.split(","):
        out = subprocess.run([*base, "--checkpointing", setting], capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"the {setting} child failed ({out.returncode}):\n{out.stderr[-3000:]}")
        rows[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    for setting, r in rows.items():
        print(f"activation_checkpointing {setting:3s}  peak RSS {r['peak_gib']:.2f} GiB, built {r['built_gib']:.2f} GiB, "
              f"steps add {r['peak_gib'] - r['built_gib']:.2f} GiB ({r['precision']}; {r['step_s']:.2f} s/step in its own process)")
    added = {s: r["peak_gib"] - r["built_gib"] for s, r in rows.items()}
    if len(rows) == 2:
        print(f"memory the steps add: {added['on'] / added['off']:.2f}x with recomputation; peak RSS "
              f"{rows['on']['peak_gib'] / rows['off']['peak_gib']:.2f}x")
    if args.rounds and len(rows) == 2:
        import torch

        torch.set_num_threads(args.threads)
        t = timing(args, c)
        n = args.rounds * args.steps
        for what, m in t.items():
            print(f"step {what} time (one process, {n} steps each, switched every step): off {m[False]:.2f} s, "
                  f"on {m[True]:.2f} s, ratio {m[True] / m[False]:.2f}x")
        print(f"load average {os.getloadavg()[0]:.2f} at the end (the machine is shared: read the ratios)")


if __name__ == "__main__":
    main()
