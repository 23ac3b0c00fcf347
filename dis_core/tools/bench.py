"""`dis bench`: time training supervision steps (forward, backward, optimizer) of a recipe.

Figures, not asserts: this machine is shared and noisy, so compare ratios measured in one run.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dis_core.loop import engine as dist
from dis_core.contract.errors import UserError


def matmul_peak_gflops(n: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32,
                       device: torch.device = torch.device("cpu")) -> float:
    """Best-of square-matmul throughput in `dtype` on `device` with the current thread count:
    the ceiling a training step in that precision is measured against."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(2):
        once()
    return 2 * n**3 / min(once() for _ in range(repeats)) / 1e9


def time_eval(solver, batches: int) -> tuple[float, int, int]:
    """(seconds per evaluation batch, examples per batch, test examples) over `batches`
    batches of the test split, each run for every supervision step, as evaluation runs them."""
    from dis_core.step.data import fetch
    from dis_core.loop.evaluation import eval_batch_size

    train = solver.recipe.train
    size = eval_batch_size(train.eval_batch_size or train.global_batch_size, dist.world_size())
    test_set = solver.dataset("test")
    times = []
    with solver.evaluating(), torch.inference_mode():
        for i in range(batches + 1):  # the first batch warms up
            idx = np.arange(i * size, (i + 1) * size) % len(test_set)
            batch = fetch(test_set, idx, solver.device)
            t0 = time.perf_counter()
            solver.rollout(batch)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times), size, len(test_set)


def check_counts(*, steps: int, warmup: int, eval_batches: int) -> None:
    """`dis bench`'s counts, checked before anything is built: a median needs a timed step."""
    wrong = [f"{flag} must be {rule}, got {value}" for flag, value, rule, ok in (
        ("--steps", steps, "at least 1", steps >= 1),
        ("--warmup", warmup, ">= 0", warmup >= 0),
        ("--eval", eval_batches, ">= 0 (0 = no evaluation timing)", eval_batches >= 0),
    ) if not ok]
    if wrong:
        raise UserError("dis bench: " + "; ".join(wrong))


def bench(resolved, registry, *, steps: int = 20, warmup: int = 3, data_dir: Path = Path("data"), eval_batches: int = 0) -> str:
    from dis_core.step.solver import Solver
    from dis_core.loop.trainer import Trainer

    check_counts(steps=steps, warmup=warmup, eval_batches=eval_batches)

    with tempfile.TemporaryDirectory() as tmp:
        solver = Solver.build(resolved, registry, data_dir)
        trainer = Trainer(resolved, registry, Path(tmp) / "bench", solver=solver)
        # The step's matmuls run in the run's precision (bf16 = autocast), so that is the ceiling.
        peak = matmul_peak_gflops(dtype=solver.dtype, device=solver.device)
        for _ in range(warmup):
            trainer.train_step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        # The machine may be shared: take the better of two peak measurements around the steps.
        peak = max(peak, matmul_peak_gflops(dtype=solver.dtype, device=solver.device))
        evaluated = time_eval(solver, eval_batches) if eval_batches else None
    train = resolved.recipe.train
    med, batch, world = statistics.median(times), train.global_batch_size, dist.world_size()
    micro = trainer.preflight.micro_batch  # train.micro_batch_size, or what "auto" chose
    cost = solver.cost
    gflops = cost.train_flops * batch / med / 1e9
    lines = [
        f"recipe              {resolved.source}",
        f"device / threads    {solver.device} / {torch.get_num_threads()}, precision {solver.precision}"
        f"{', compiled (train.compile)' if train.compile else ''}",
        f"batch               {batch} (x {world} processes)",
        f"step time           median {med * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms over {steps} steps",
        f"throughput          {batch / med:.1f} examples x steps / s",
        f"network calls       {cost.calls} per step ({cost.grad_calls} with grad), {cost.calls * batch / med:.0f} calls / s",
        f"achieved            {gflops:.1f} GFLOP/s = {100 * gflops / peak:.0f}% of the measured {solver.precision} matmul peak {peak:.1f} GFLOP/s",
        f"peak memory (RSS)   {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB for the whole process "
        f"(micro-batch {micro} slots per process)",
        f"load average        {os.getloadavg()[0]:.2f} (figures from a busy machine are not comparable)",
    ]
    if evaluated:
        per_batch, size, total = evaluated
        whole = math.ceil(total / size) * per_batch
        lines.insert(-1, f"evaluation          {size / per_batch:.1f} test examples / s ({size} per batch, "
                         f"{solver.halting.max_steps} steps each); the {total} test examples take "
                         f"{whole / 3600:.2f} h on this machine ({whole:.0f} s)")
    return "\n".join(lines)
