"""Everything distributed lives here: process-group start-up, the DeepSpeed engine and collectives.

One process with no launcher, `deepspeed --num_gpus N`, `torchrun` and multi-node launches all
go through `init_distributed`. On CPU the backend is gloo and the precision fp32; on GPU nccl
and bf16 by default.
"""

from __future__ import annotations

import copy
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from dis_core.errors import UserError

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
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's GPU probe and its warning
    import deepspeed

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


def accumulation(global_batch: int, world: int, micro: int | None) -> tuple[int, int]:
    """(slots per forward on each process, forwards per optimizer step)."""
    if global_batch % world:
        raise UserError(f"train.global_batch_size={global_batch} is not divisible by the {world} processes")
    share = global_batch // world
    micro = micro or share
    if share % micro:
        raise UserError(
            f"train.micro_batch_size={micro} does not divide the {share} slots of each of the {world} "
            f"process(es) (train.global_batch_size={global_batch})"
        )
    return micro, share // micro


def deepspeed_config(user: dict, *, global_batch: int, world: int, precision: str, grad_clip: float, micro_batch: int | None = None) -> dict:
    """The DeepSpeed config: our batch bookkeeping and precision, then the recipe's
    `[deepspeed]` table on top (so experts can set ZeRO stages, comms options, ...). Every key
    whose DeepSpeed default would change training is written explicitly."""
    micro, accumulate = accumulation(global_batch, world, micro_batch)
    cfg: dict = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulate,
        "steps_per_print": 10**9,  # our own logging reports progress
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 0},
        # bf16 is autocast inside the supervision step, over fp32 weights; DeepSpeed's own bf16
        # mode would hold the weights themselves in bf16 (and measured barely faster on CPU).
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # Plain averaging of the gradients over processes, after the backward.
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        # A client optimizer (AdamATan2, ...) under ZeRO needs this flag.
        "zero_allow_untested_optimizer": True,
        # Always written: without the key DeepSpeed clips at norm 1.0. 0.0 = off (the reference
        # code never clips).
        "gradient_clipping": float(grad_clip),
    }
    merged = copy.deepcopy(cfg)
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if merged[key] != cfg[key]:
            raise UserError(
                f"[deepspeed].{key} conflicts with train.global_batch_size / train.micro_batch_size; set the batch in [train] only"
            )
    if "optimizer" in merged or "scheduler" in merged:
        raise UserError("[deepspeed] must not set optimizer/scheduler: use [train.optimizer] and [train.schedule]")
    return merged


def make_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine
