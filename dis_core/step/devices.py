"""The device, the precision and the processes of a run: process-group start-up and the few
collectives dis uses (rank 0 gathers, sums). One process with no launcher, `deepspeed --num_gpus N`,
`torchrun` and multi-node launches all go through `init_distributed`. On CPU the backend is gloo;
on GPU nccl.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist

from dis_core.wiring.deepspeed_table import import_deepspeed, launch_world_size  # noqa: F401  (launch_world_size: re-exported)

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SELF_SET = False  # whether this process set LAUNCHER_VARS itself (no launcher)
_AT_EXIT: list[bool] = []  # end_processes registered with atexit


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
    global _SELF_SET
    deepspeed = import_deepspeed(cpu=device.type == "cpu")
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        _SELF_SET = True
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Imported before the group exists, never after: its functions take `group=group.WORLD` as a
    # default argument, evaluated at import. Imported later (torch._dynamo imports it, through
    # torch.distributed.fsdp, on the first compiled or dynamo-disabled call of a training step),
    # they would hold the default group, and its gloo and store threads, for the life of the
    # process: past `end_processes`, into the interpreter's exit (see there).
    import torch.distributed.nn.functional as _before_the_group  # noqa: F401
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl", verbose=False)
    if not _AT_EXIT:  # a script using dis_core.load under a launcher ends its group too (the CLI ends it itself)
        atexit.register(end_processes)
        _AT_EXIT.append(True)


def end_processes() -> None:
    """Destroy this process's group (and DeepSpeed's references to it), at the end of a command.

    Left to the interpreter's exit, gloo's worker threads outlive it: a worker that finishes a
    collective after the main thread has begun finalizing (the last `gather_object` of an
    evaluation, say) releases the work's tensors, needs the GIL to do so, and is ended by the
    finalizing interpreter inside C++ code that may not be unwound: "terminate called without an
    active exception", SIGABRT, in about half of the two-process `dis eval` launches. Destroying the
    group joins those threads first. No barrier: a rank that failed ends here too, and must not
    wait for the others. The launcher variables a lone process set itself are removed, so that
    a later command in the same process starts a fresh group (on a fresh port).

    The threads end only when the last reference to the group goes: `destroy_process_group`
    shuts gloo's backend down and empties torch's and DeepSpeed's tables, but gloo's run-loop,
    transport and (rank 0) TCP store threads live as long as the C++ object. Hence the import of
    `torch.distributed.nn.functional` in `init_distributed`, whose default arguments would
    otherwise keep it (tests/test_faults.py counts the threads left after a command)."""
    global _SELF_SET
    if dist.is_available() and dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None and ds_comm.cdb.is_initialized():
            ds_comm.destroy_process_group()  # also drops the groups DeepSpeed keeps
        else:
            dist.destroy_process_group()
        gc.collect()  # a finished trainer's engine, in a reference cycle, still holds the group: its threads end with it
    if _SELF_SET:
        for key in LAUNCHER_VARS:
            os.environ.pop(key, None)
        _SELF_SET = False


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
    AMX (read from the CPU's flags in /proc/cpuinfo, never assumed: torch's capability string
    says "AVX512" with or without them, and an x86 CPU without them runs bf16 autocast ~25x
    slower than fp32). Elsewhere (no /proc/cpuinfo, another architecture) False."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:  # not Linux: no cheap, reliable probe
        return frozenset()


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses. auto: bf16 where the device computes bf16 natively (`native_bf16`:
    CUDA with bf16 support; a CPU with AVX512-BF16 or AMX), fp32 elsewhere. bf16 means autocast
    around the backbone: weights, optimizer and the stablemax loss stay in fp32/float64.

    bf16 on such CPUs too: a training step 1.85x on the CPU recipes and 1.3-1.5x with attention,
    at no accuracy cost that 5 + 3 seeds could measure (docs/results/precision_cpu.md). fp32
    would not make a recipe train alike on every CPU either: it is not bit-reproducible across
    CPU kinds (the official code's logits differ by 4.5e-5 between two machines with the same
    torch). run.json records the choice and `dis eval` / `dis_core.load` reuse it; the golden
    traces and fidelity checks ask for fp32 explicitly."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision
