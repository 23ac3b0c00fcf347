"""The rules of a recipe's batch split and `[deepspeed]` table, and the DeepSpeed config they give.

Checked when a recipe is loaded (`deepspeed_problems`, so `--dry-run` refuses what a run would)
and applied when the engine is made (`deepspeed_config`): one set of rules for both. Every key
whose DeepSpeed default would change training is written explicitly.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist

from dis_core.contract.errors import UserError


def import_deepspeed(*, cpu: bool):
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's GPU probe and its warning
    import deepspeed

    return deepspeed


def launch_world_size() -> int:
    """The processes of this run, known before the process group starts (the launcher's
    WORLD_SIZE; 1 without a launcher)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


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
    inside the supervision step (dis_core.step.solver), so DeepSpeed's own modes stay off whatever it
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

    import_deepspeed(cpu=not torch.cuda.is_available())
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
