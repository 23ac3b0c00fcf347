"""Time one supervision step of a recursive backbone on CPU: forward, stablemax loss,
backward, AdamW step, with the carry detached between steps as the trainer does.

Defaults are the N-Queens-sized setting (D 128, 2 layers, 4 heads, S 64, B 64, T 1, n 2,
fp32, 2 threads), whose budget is ~600 ms/step (the official TRM code on the 2-core machine).
Prints the median over --steps steps after --warmup steps, examples x steps per second and the
achieved GFLOP/s, counting a step as (calls + 2 * grad_calls) * flops_per_call(S) * B.
Other processes may share the CPU: the line also gives the CPU time per step (all threads)
and the load average; compare runs made back to back, or use --repeat.

    .venv/bin/python benchmarks/bench_backbone.py
    .venv/bin/python benchmarks/bench_backbone.py --backbone hrm --hidden 64 --batch 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from dis_core.contract.interfaces import BuildContext, TaskSpec
from dis_core.step.losses import per_sequence_ce


def build(args):
    spec = TaskSpec(vocab_size=args.vocab, seq_len=args.seq)
    ctx = BuildContext(seed=0, n_sup=args.n_sup, data_dir=Path("."), spec=spec)
    common = dict(hidden_size=args.hidden, num_heads=args.heads, expansion=args.expansion, T=args.T, n=args.n,
                  step_embedding=True, puzzle_emb_ndim=args.puzzle_ndim, puzzle_emb_len=args.puzzle_len)
    if args.backbone == "trm":
        from dis_plugins.backbones.trm import TRMConfig, build_trm

        return build_trm(TRMConfig(num_layers=args.layers, **common), ctx)
    from dis_plugins.backbones.hrm import HRMConfig, build_hrm

    return build_hrm(HRMConfig(H_layers=args.layers, L_layers=args.layers, **common), ctx)


def run(args) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    model = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    B = args.batch
    tokens = torch.randint(0, args.vocab, (B, args.seq))
    labels = torch.randint(0, args.vocab, (B, args.seq))
    puzzle = torch.randn(B, args.puzzle_ndim) if args.puzzle_ndim else None
    state = model.initial_state(B)
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step = torch.full((B,), i % args.n_sup + 1)
        state, logits, q = model(state, tokens, step, puzzle)
        loss = per_sequence_ce(logits, labels).sum() / B
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state = tuple(s.detach() for s in state)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return times, cpu


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=("trm", "hrm"), default="trm")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--expansion", type=float, default=4.0)
    p.add_argument("--seq", type=int, default=64, help="task sequence length L")
    p.add_argument("--vocab", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--T", type=int, default=1)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--n-sup", type=int, default=8)
    p.add_argument("--puzzle-ndim", type=int, default=0)
    p.add_argument("--puzzle-len", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1, help="repeat the whole measurement")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args)
    calls, grad_calls = model.calls_per_step()
    S = model.seq_len
    flops = (calls + 2 * grad_calls) * model.flops_per_call(S) * args.batch
    n_params = sum(q.numel() for q in model.parameters())
    print(f"{args.backbone}: D {args.hidden}, layers {args.layers}, heads {args.heads}, S {S}, B {args.batch}, "
          f"T {args.T}, n {args.n}, {n_params:,} params, {calls} calls ({grad_calls} with grad), "
          f"{flops / 1e9:.1f} GFLOP/step, torch {torch.__version__}, {args.threads} threads")
    for r in range(args.repeat):
        times, cpu = run(args)
        med = statistics.median(times)
        # CPU time (all threads) is steadier than wall time when other processes share the cores.
        print(f"[{r}] median {med * 1e3:.1f} ms/step (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}), "
              f"{args.batch / med:.1f} examples x steps/s, {flops / med / 1e9:.1f} GFLOP/s; "
              f"CPU {statistics.median(cpu) * 1e3:.1f} ms/step, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
