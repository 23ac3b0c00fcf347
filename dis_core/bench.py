"""`dis bench`: time training supervision steps (forward, backward, optimizer) of a recipe.

Figures, not asserts: this machine is shared and noisy, so compare ratios measured in one run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def matmul_peak_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Best-of fp32 square-matmul throughput with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def bench(resolved, registry, *, steps: int = 20, warmup: int = 3, data_dir: Path = Path("data")) -> str:
    from dis_core.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(resolved, registry, Path(tmp) / "bench", data_dir=data_dir)
        peak = matmul_peak_gflops()
        for _ in range(warmup):
            trainer.train_step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        # The machine may be shared: take the better of two peak measurements around the steps.
        peak = max(peak, matmul_peak_gflops())
    med = statistics.median(times)
    batch = resolved.recipe.train.global_batch_size
    cost = trainer.cost
    gflops = cost.train_flops * batch / med / 1e9
    lines = [
        f"recipe              {resolved.source}",
        f"device / threads    {trainer.device} / {torch.get_num_threads()}, precision {trainer.precision}",
        f"batch               {batch} (x {trainer.world} processes)",
        f"step time           median {med * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms over {steps} steps",
        f"throughput          {batch / med:.1f} examples x steps / s",
        f"network calls       {cost.calls} per step ({cost.grad_calls} with grad), {cost.calls * batch / med:.0f} calls / s",
        f"achieved            {gflops:.1f} GFLOP/s = {100 * gflops / peak:.0f}% of the measured fp32 matmul peak {peak:.1f} GFLOP/s",
        f"load average        {os.getloadavg()[0]:.2f} (figures from a busy machine are not comparable)",
    ]
    return "\n".join(lines)
