"""The device, the precision and the processes of a run: process-group start-up and the few
collectives dis uses (rank 0 gathers, sums). One process with no launcher, `deepspeed --num_gpus N`,
`torchrun` and multi-node launches all go through `init_distributed`. On CPU the backend is gloo;
on GPU nccl.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from dis_core.wiring.deepspeed_table import import_deepspeed, launch_world_size  # noqa: F401  (launch_world_size: re-exported)

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(device: torch.device) -> None:
    """Start (once per process) the process group DeepSpeed needs.

    Without a launcher DeepSpeed tries MPI discovery and fails (no mpi4py), so a lone process
    sets the five launcher variables itself. On CPU, DeepSpeed's shared-memory collective op would
    be JIT-built on first use (~55 s per machine); plain gloo collectives are used instead.
    """
    deepspeed = import_deepspeed(cpu=device.type == "cpu")
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl", verbose=False)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (None elsewhere). Works without a process group too."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: CUDA with bf16 support, or a CPU with AVX512-BF16 or
    AMX (read from the CPU's flags, never assumed: an x86 CPU without them runs bf16 autocast
    ~25x slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no cheap, reliable probe, so stay in fp32
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on CUDA with bf16 support, fp32 elsewhere. bf16 means autocast around the
    backbone: weights, optimizer and the stablemax loss stay in fp32/float64.

    CPUs stay fp32 under auto even with native bf16 (AVX512-BF16, AMX), so that a recipe and
    seed train the same way on every CPU: whether a CPU has native bf16 is a property of the
    machine (without it bf16 is ~25x slower), and fp32 is what the golden traces pin to the
    official code. Where the CPU has it, bf16 is the faster choice (a step 1.85x on the CPU
    recipes, no measurable accuracy cost: docs/results/precision_cpu.md); ask for it with
    `train.precision = "bf16"`."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    return precision
