"""Throughput of one training supervision step: the official TRM code against dis, in one run.

Both sides do the same work per optimizer step: a forward over the carry, the stablemax loss,
backward, AdamW (and the puzzle table's sign-SGD where the config has a prefix). The official
side is its own `train_batch` (TRM repository, ACTV1 + ACTLossHead, fp32, no torch.compile);
dis is the whole `Trainer.train_step` (DeepSpeed engine included) in fp32 and in bf16 autocast.
Rounds alternate the three so that machine noise hits them alike; the medians, their ratios,
and the share of the fp32 / bf16 matmul peaks (measured in the same run) are printed.

    .venv/bin/python benchmarks/bench_vs_official.py --trm ../TinyRecursiveModels

Configs (from issue "Scale and speed"):
    a: D128, 2 layers, 4 heads, L 64 (no prefix), batch 64, T 1, n 2
    b: D256, 1 layer, 8 heads, L 900 + 16 prefix positions, batch 8, T 1, n 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import attrs
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent / "parity"))
from official import prepare, use_repo  # noqa: E402

from dis_core import hookimpl  # noqa: E402
from dis_core.contract.interfaces import TaskSpec  # noqa: E402

CONFIGS = {
    "a": dict(hidden=128, layers=2, heads=4, seq=64, prefix=0, batch=64, vocab=3),
    "b": dict(hidden=256, layers=1, heads=8, seq=900, prefix=16, batch=8, vocab=12),
}
N_SUP = 6
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # dis picks the same device


def make_batch(c: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    B, L, V = c["batch"], c["seq"], c["vocab"]
    return {
        "inputs": rng.integers(0, V, (B, L)).astype(np.int32),
        "labels": rng.integers(0, V, (B, L)).astype(np.int32),
        "puzzle_identifiers": rng.integers(1, 8, B).astype(np.int32),
    }


def block_flops(c: dict) -> float:
    from dis_plugins.backbones.layers import block_flops as f

    return f(c["seq"] + c["prefix"], c["hidden"], 4.0)


def step_flops(c: dict) -> float:
    """One supervision step, forward + backward (2x the grad part), T 1 n 2: 3 calls, all with grad."""
    return (3 + 2 * 3) * c["layers"] * block_flops(c) * c["batch"]


# ---------------------------------------------------------------------------------- official


def official_step(trm: Path, c: dict):
    use_repo(trm)
    from models.losses import ACTLossHead
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
    from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
    from pretrain import train_batch

    cfg = dict(
        batch_size=c["batch"], seq_len=c["seq"], vocab_size=c["vocab"], num_puzzle_identifiers=8,
        puzzle_emb_ndim=c["hidden"] if c["prefix"] else 0, puzzle_emb_len=c["prefix"], hidden_size=c["hidden"],
        num_heads=c["heads"], expansion=4.0, pos_encodings="rope", forward_dtype="float32", H_layers=0,
        L_layers=c["layers"], H_cycles=1, L_cycles=2, halt_max_steps=N_SUP, halt_exploration_prob=0.1, causal=False,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = ACTLossHead(TinyRecursiveReasoningModel_ACTV1(cfg), loss_type="stablemax_cross_entropy")
    optimizers = [torch.optim.AdamW(model.parameters(), lr=0, weight_decay=0.1, betas=(0.9, 0.95))]
    lrs = [1e-4]
    if c["prefix"]:
        optimizers.insert(0, CastedSparseEmbeddingSignSGD_Distributed(model.model.puzzle_emb.buffers(), lr=0, weight_decay=0.1, world_size=1))
        lrs.insert(0, 1e-2)
    rng = np.random.default_rng(0)
    batch = {k: torch.from_numpy(v).to(DEVICE) for k, v in make_batch(c, rng).items()}
    state = types.SimpleNamespace(model=model, optimizers=optimizers, optimizer_lrs=lrs, carry=model.initial_carry(batch), step=0, total_steps=10**9)
    config = types.SimpleNamespace(lr_warmup_steps=0, lr_min_ratio=1.0)
    return lambda: train_batch(config, state, batch, global_batch_size=c["batch"], rank=0, world_size=1)


# ---------------------------------------------------------------------------------- dis


@attrs.frozen
class _NoOptions:
    pass


class RandomTask:
    """A task of random sequences of the config's shape (the step's cost does not depend on data)."""

    def __init__(self, c: dict):
        self.c = c

    @hookimpl
    def register_tasks(self, register):
        c = self.c

        class Split:
            def __len__(self):
                return 4096

            def get(self, indices):
                rng = np.random.default_rng(0)
                b = make_batch(dict(c, batch=len(indices)), rng)
                return {"inputs": b["inputs"], "labels": b["labels"], "puzzle_ids": b["puzzle_identifiers"].astype(np.int64), "example_ids": indices}

        class Task:
            spec = TaskSpec(vocab_size=c["vocab"], seq_len=c["seq"], num_puzzle_ids=8)

            def dataset(self, split):
                return Split()

        register("bench_random", _NoOptions, lambda config, ctx: Task())


def dis_step(c: dict, precision: str, threads: int, workdir: Path, compile_: bool = False):
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe
    from dis_core.loop.trainer import Trainer

    registry = load_registry(extra_plugins=(RandomTask(c),))
    prefix = f", puzzle_emb_ndim = {c['hidden']}, puzzle_emb_len = {c['prefix']}" if c["prefix"] else ""
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = workdir / f"bench_{precision}{'_compiled' if compile_ else ''}.toml"
    recipe.write_text(f"""
[task]
name = "bench_random"
[backbone]
name = "trm"
config = {{ hidden_size = {c['hidden']}, num_layers = {c['layers']}, num_heads = {c['heads']}, T = 1, n = 2, step_embedding = true{prefix} }}
[targets]
name = "reveal_path"
[supervision]
n_sup = {N_SUP}
[train]
global_batch_size = {c['batch']}
steps = 1000000
precision = "{precision}"
threads = {threads}
compile = {str(compile_).lower()}
[train.optimizer]
name = "adamw"
config = {{ lr = 1e-4 }}
""")
    trainer = Trainer(load_recipe(recipe, registry), registry, workdir / f"run_{recipe.stem}", data_dir=workdir / "data")
    return trainer.train_step


# ---------------------------------------------------------------------------------- timing


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 8) -> float:
    if DEVICE == "cuda":
        n = 8192
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    for _ in range(2):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def profile_ops(label: str, step, n: int, rows: int = 12) -> None:
    """What a step spends its time on, op by op: torch.profiler's self CPU time of each op over
    `n` steps (a compiled region's fused kernels count as their own rows), the largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    print(f"  profile of {label} ({n} steps; self CPU time, share of the profiled total):")
    for e in events[:rows]:
        print(f"    {100 * e.self_cpu_time_total / total:5.1f}%  {e.self_cpu_time_total / 1e3 / n:8.1f} ms a step  "
              f"x{e.count // n:<5d} {e.key[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trm", type=Path, required=True, help="checkout of SamsungSAILMontreal/TinyRecursiveModels")
    ap.add_argument("--configs", default="a,b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side and round (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time dis in bf16 with train.compile = true")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N steps of each dis side: the ops by their own CPU time, a share of the step each")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prepare(cpu=DEVICE == "cpu")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else torch.backends.cpu.get_cpu_capability()
    print(f"machine: {where}, {args.threads} threads, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}; matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            c = CONFIGS[name]
            sides = {
                "official fp32": official_step(args.trm, c),
                "dis fp32": dis_step(c, "fp32", args.threads, Path(tmp) / f"{name}32"),
                "dis bf16": dis_step(c, "bf16", args.threads, Path(tmp) / f"{name}16"),
                **({"dis bf16+compile": dis_step(c, "bf16", args.threads, Path(tmp) / f"{name}16c", compile_=True)}
                   if args.compile else {}),
            }
            times: dict[str, list[float]] = {k: [] for k in sides}
            for _ in range(args.rounds):
                for label, step in sides.items():
                    for _ in range(2):
                        step()
                    times[label] += [_timed(step) for _ in range(args.steps)]
            flops = step_flops(c)
            base = statistics.median(times["official fp32"])
            print(f"\nconfig {name}: {c}  ({flops / 1e9:.1f} GFLOP per step)")
            for label, ts in times.items():
                med = statistics.median(ts)
                gf = flops / med / 1e9
                peak = peaks["bf16" if "bf16" in label else "fp32"]
                print(f"  {label:17s} {med * 1e3:8.1f} ms  {base / med:5.2f}x official  {gf:6.1f} GFLOP/s = {100 * gf / peak:3.0f}% of the {'bf16' if 'bf16' in label else 'fp32'} peak")
            if args.profile:
                for label, step in sides.items():
                    if label.startswith("dis"):
                        profile_ops(label, step, args.profile)
    print(f"\nload at the end {os.getloadavg()[0]:.2f} (figures from a busy machine are not comparable)")


if __name__ == "__main__":
    main()
