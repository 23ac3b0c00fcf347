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


def _import_deepspeed(*, cpu: bool):
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's GPU probe and its warning
    import deepspeed

    return deepspeed


def launch_world_size() -> int:
    """The processes of this run, known before the process group starts (the launcher's
    WORLD_SIZE; 1 without a launcher)."""
    return world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> None:
    """Start (once per process) the process group DeepSpeed needs.

    Without a launcher DeepSpeed tries MPI discovery and fails (no mpi4py), so a lone process
    sets the five launcher variables itself. On CPU, DeepSpeed's shared-memory collective op would
    be JIT-built on first use (~55 s per machine); plain gloo collectives are used instead.
    """
    deepspeed = _import_deepspeed(cpu=device.type == "cpu")
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


def _accumulation_problem(global_batch: int, world: int, micro: int | None) -> tuple[str, str] | None:
    """(recipe key, message) when the batch cannot be split over `world` processes."""
    if global_batch % world:
        return "train.global_batch_size", f"train.global_batch_size={global_batch} is not divisible by the {world} processes"
    share = global_batch // world
    if share % (micro or share):
        return "train.micro_batch_size", (
            f"train.micro_batch_size={micro} does not divide the {share} slots of each of the {world} "
            f"process(es) (train.global_batch_size={global_batch})"
        )
    return None


def accumulation(global_batch: int, world: int, micro: int | None) -> tuple[int, int]:
    """(slots per forward on each process, forwards per optimizer step)."""
    problem = _accumulation_problem(global_batch, world, micro)
    if problem:
        raise UserError(problem[1])
    share = global_batch // world
    micro = micro or share
    return micro, share // micro


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
ZERO_STAGES = (0, 1, 2)  # stage 3 partitions the parameters, which dis reads whole


def _base_config(*, global_batch: int, world: int, grad_clip: float, micro_batch: int | None) -> dict:
    micro, accumulate = accumulation(global_batch, world, micro_batch)
    return {
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


def _merge(cfg: dict, user: dict) -> dict:
    """`user` over `cfg`, a nested table one level deep."""
    merged = copy.deepcopy(cfg)
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _same_kind(value: Any, like: Any) -> bool:
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(like, bool)
    if isinstance(like, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(like))


def _toml(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", dict: "a table", str: "a string"}.get(type(value), type(value).__name__)


def _table_problems(user: dict, cfg: dict) -> list[tuple[str, str]]:
    """(key path under [deepspeed], message) for each key dis refuses: the batch and the optimizer
    belong in [train], ZeRO stage 3 is not supported, and a key dis writes itself must keep its type."""
    merged = _merge(cfg, user)
    out = []
    for key in BATCH_KEYS:
        if key in user and merged[key] != cfg[key]:
            out.append((key, f"[deepspeed].{key} conflicts with train.global_batch_size / train.micro_batch_size; "
                             f"set the batch in [train] only"))
    for key in ("optimizer", "scheduler"):
        if key in user:
            out.append((key, "[deepspeed] must not set optimizer/scheduler: use [train.optimizer] and [train.schedule]"))
    for key, value in user.items():
        like = cfg.get(key)
        if key in BATCH_KEYS or like is None:
            continue
        if not _same_kind(value, like):
            out.append((key, f"invalid value (expected {_toml(like)}, got {_toml(value)} {value!r})"))
        elif isinstance(like, dict):
            out += [(f"{key}.{k}", f"invalid value (expected {_toml(like[k])}, got {_toml(v)} {v!r})")
                    for k, v in value.items() if k in like and not _same_kind(v, like[k]) and (key, k) != ("zero_optimization", "stage")]
    zero = merged.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if isinstance(zero, dict) and (isinstance(stage, bool) or stage not in ZERO_STAGES):
        if stage == 3 and not isinstance(stage, bool):
            why = (f"ZeRO stage 3 is not supported: it partitions the parameters, which dis reads whole (evaluation, "
                   f"EMA, checkpoints, the puzzle embedding); use stage {', '.join(map(str, ZERO_STAGES))}")
        else:
            why = f"invalid value (expected one of {', '.join(map(str, ZERO_STAGES))}, got {stage!r})"
        out.append(("zero_optimization.stage", why))
    return out


def deepspeed_config(user: dict, *, global_batch: int, world: int, grad_clip: float, micro_batch: int | None = None) -> dict:
    """The DeepSpeed config: our batch bookkeeping, then the recipe's `[deepspeed]` table on top
    (so experts can set ZeRO stages, comms options, ...). Every key whose DeepSpeed default would
    change training is written explicitly. The precision is not DeepSpeed's: bf16 is autocast
    inside the supervision step (dis_core.solver), so DeepSpeed's own modes stay off whatever it
    is. A recipe is checked against the same rules when it is loaded (`deepspeed_problems`)."""
    cfg = _base_config(global_batch=global_batch, world=world, grad_clip=grad_clip, micro_batch=micro_batch)
    problems = _table_problems(user, cfg)
    if problems:
        raise UserError("; ".join(message for _, message in problems))
    return _merge(cfg, user)


def deepspeed_problems(user: dict, *, global_batch: int, micro_batch: int | None, grad_clip: float,
                       world: int | None = None) -> list[str]:
    """What a run would refuse in the recipe's batch and `[deepspeed]` table, found when the recipe
    is loaded ('message @ $.deepspeed.key' lines): `deepspeed_config`'s rules, then, if those pass,
    DeepSpeed's own config check of each key of the table (which imports DeepSpeed: only for a
    recipe that has the table). `world` defaults to the launcher's process count."""
    world = launch_world_size() if world is None else world
    problem = _accumulation_problem(global_batch, world, micro_batch)
    if problem:
        return [f"{problem[1]} @ $.{problem[0]}"]
    cfg = _base_config(global_batch=global_batch, world=world, grad_clip=grad_clip, micro_batch=micro_batch)
    out = [f"{message} @ $.deepspeed.{key}" for key, message in _table_problems(user, cfg)]
    if out or not user:
        return out
    return [f"{message} @ $.deepspeed{'.' + key if key else ''}" for key, message in _deepspeed_refusals(user, cfg)]


def _deepspeed_refusals(user: dict, cfg: dict) -> list[tuple[str, str]]:
    """DeepSpeed's own config check (`DeepSpeedConfig`, what `deepspeed.initialize` builds first),
    run once per key of the table over dis's config so that each refusal names its key, then on the
    whole table (for refusals that involve two keys)."""
    import pydantic

    _import_deepspeed(cpu=not torch.cuda.is_available())
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed derives the global batch from the process count it sees (1 before the process
    # group starts); the batch itself is checked above.
    base = {k: v for k, v in cfg.items() if k != "train_batch_size"}

    def check(table: dict, key: str) -> list[tuple[str, str]]:
        try:
            DeepSpeedConfig(_merge(base, table))
        except pydantic.ValidationError as exc:
            out = []
            for err in exc.errors():
                loc = [str(part) for part in err["loc"]]
                if err["type"] == "extra_forbidden":
                    what = f"unknown key (DeepSpeed: {err['msg']})"
                else:
                    what = f"invalid value (DeepSpeed: {err['msg']}, got {err['input']!r})"
                if not key:  # the whole table: the location is within a model of unknown key
                    out.append(("", f"{what} in {exc.title} at {'.'.join(loc)}"))
                    continue
                # Most models read their own table (`stage`); a few read the whole config (`tensorboard.enabled`).
                out.append((".".join(loc if loc and loc[0] == key else [key, *loc]), what))
            return out
        except Exception as exc:  # DeepSpeed checks with asserts, ValueErrors, TypeErrors, ...
            return [(key, f"DeepSpeed refuses it: {type(exc).__name__}: {exc}".rstrip(": "))]
        return []

    out = [problem for key in user for problem in check({key: user[key]}, key)]
    return out or check(user, "")


def make_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine
