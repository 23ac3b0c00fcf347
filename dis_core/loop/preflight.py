"""The preflight: what a run will take, measured before its first step, and whether it fits.

Every run (and `--dry-run`) reports, per process:
  - the work: optimizer steps, the examples they consume, the evaluations;
  - memory: what the process holds once built (libraries, data, model, puzzle table: its resident
    size; on a GPU, the memory allocated), the optimizer's state, the EMA copy, the carry of slots,
    the activations of one micro-batch, an evaluation batch and the evaluators' state, against
    the memory available (cgroup limit, MemAvailable, or the GPU's free memory);
  - time on this machine, and for ARC recipes on GPUs by the published figures.

Activations are measured, not guessed: a probe step on the recipe's real shapes
(dis_core.loop.probe), extrapolated linearly in the slots. Allocation patterns at the real
micro-batch differ from the probe's, so a run must fit with `HEADROOM` to spare.

A run that cannot fit stops here with exit status 2, naming what it needs, what is available and
the setting that makes it fit; `train.micro_batch_size = "auto"` takes that setting itself.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import attrs
import torch

from dis_core.contract.errors import UserError
from dis_core.contract.logs import in_words
from dis_core.loop.evaluation import eval_batch_size
from dis_core.loop.probe import Probe, available_memory, eval_split, probe, resident_bytes, tensor_bytes

GiB = 2**30
HEADROOM = 1.25  # needed x this must be available: kernels' own buffers and allocator slack (see docs/recipes.md)


class PreflightError(UserError):
    """The run cannot fit in the memory available (exit status 2, before the first step)."""


# ------------------------------------------------------------------ the work


def total_steps(train, train_examples: int, max_steps: int) -> int:
    """Optimizer steps of a run: `train.steps`, or `train.epochs` passes over the training split,
    each example run for `max_steps` supervision steps (exact for `fixed` halting; with ACT
    halted slots take new data sooner)."""
    if train.steps is not None:
        return train.steps
    return max(1, math.ceil(train.epochs * train_examples * max_steps / train.global_batch_size))


def evaluations(steps: int, interval: int) -> int:
    """Evaluations of a run: one every `interval` steps before the last, and the final one."""
    return math.ceil(steps / interval) if interval else 1


# ------------------------------------------------------------------ GPUs, by the published figures


@attrs.frozen(kw_only=True)
class Anchor:
    """A published wall time of a whole run: what the GPU estimates scale from."""

    recipe: str  # the recipe that reproduces that run
    hours: float
    gpus: int
    gpu: str
    source: str
    flops: float  # that run's training and evaluation FLOPs, as dis counts them (`run_flops`)
    flops_per_call: float  # its network's forward FLOPs per call and example: the anchor nearest in this is used

    def label(self) -> str:
        return f"{Path(self.recipe).stem}: {self.hours:g} h on {self.gpus} {self.gpu}, {self.source}"


# The DIS paper: DIS-compact ~40 h and TRM ~72 h on 4 H100s (the TRM README: ~3 days on 4 H100s for
# ARC-AGI-1). FLOPs by `run_flops` of each recipe's steps, batch, evaluations and per-example
# FLOPs (`dis-run RECIPE --dry-run --json`). A recipe is scaled from the anchor whose network call
# costs most alike, since a GPU's efficiency depends mostly on that: by these figures an H100 runs
# D 256 x 1 layer at ~31 TFLOP/s and D 512 x 2 layers at ~167.
PUBLISHED = (
    Anchor(recipe="recipes/arc1_compact.toml", hours=40, gpus=4, gpu="H100", source="the DIS paper",
           flops=1.8061e19, flops_per_call=2.42e9),
    Anchor(recipe="recipes/arc1_trm.toml", hours=72, gpus=4, gpu="H100", source="the DIS paper; the TRM README: ~3 days",
           flops=1.735e20, flops_per_call=1.5923e10),
)
GPU_MEMORY = {"H100": 80 * 10**9}  # H100 SXM and PCIe: 80 GB
GPU_COUNTS = (1, 4, 8)


def run_flops(cost, *, steps: int, global_batch: int, evaluations: int, eval_examples: int, eval_steps: int, rollouts: int = 1) -> float:
    """Training FLOPs (every slot runs a supervision step per optimizer step) and evaluation
    FLOPs (every test example run for `eval_steps` steps, `rollouts` times)."""
    return steps * global_batch * cost.train_flops + evaluations * eval_examples * eval_steps * cost.eval_flops * rollouts


ANCHOR_REACH = 4.0  # how far (as a ratio of FLOPs per call) a recipe may be from its anchor and still be scaled from it


def nearest_anchor(flops_per_call: float) -> Anchor | None:
    """The published run whose network call costs most alike, or None when none is within
    `ANCHOR_REACH`: a much smaller network runs a GPU far below the anchor's throughput (launch
    latency, not FLOPs, sets its pace), so scaling by FLOPs would promise seconds for a run that
    takes minutes."""
    anchor = min(PUBLISHED, key=lambda a: abs(math.log(a.flops_per_call / flops_per_call)))
    return anchor if abs(math.log(anchor.flops_per_call / flops_per_call)) <= math.log(ANCHOR_REACH) else None


# ------------------------------------------------------------------ the plan


@attrs.frozen(kw_only=True)
class Preflight:
    """What a run will take (per process) and the settings chosen; `problem` says why it cannot run."""

    recipe: str
    device: str
    precision: str  # "fp32" or "bf16": what the probe ran in, as the run will
    world: int
    steps: int
    global_batch: int
    examples: int  # fresh examples the steps consume (each run for up to max_steps supervision steps)
    train_examples: int
    max_steps: int
    evaluations: int
    eval_examples: int  # test examples per evaluation
    micro_batch: int  # slots per forward/backward chosen
    micro_batch_setting: Any  # train.micro_batch_size as written: None, an int or "auto"
    accumulation: int
    eval_batch: int  # evaluation batch chosen, all processes together
    memory: dict = attrs.field(factory=dict)  # bytes per process, by part; empty without a probe
    needed: int | None = None
    available: int | None = None
    available_source: str = ""
    seconds: dict = attrs.field(factory=dict)  # "train", "evaluation", "total", "step" on this machine; empty without a probe
    gpus: dict | None = None  # ARC: the published anchor and the estimates on 1/4/8 of its GPUs
    probe_seconds: float | None = None
    problem: str | None = None  # why the run cannot fit, and the setting that makes it fit
    note: str | None = None  # a run far too long for this machine: the recipe meant for it
    unmeasured: str | None = None  # why memory and time were not measured (train.preflight = false, a failing probe)
    caveats: list = attrs.field(factory=list)  # why the time estimate may read long or short (busy CPU, eager probe)

    def as_dict(self) -> dict:
        return attrs.asdict(self)


def cpu_recipe(resolved) -> str:
    """The recipe meant for a CPU, named for a run too long for this one."""
    folder = Path(resolved.source).parent
    if resolved.recipe.task.name == "arc":
        return str(folder / "arc1_cpu.toml") if (folder / "arc1_cpu.toml").is_file() else "a CPU-sized ARC recipe"
    return str(folder / "nqueens_quick.toml") if (folder / "nqueens_quick.toml").is_file() else "a CPU-sized recipe (nqueens_quick.toml)"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(resolved, solver, *, world: int = 1, local_processes: int | None = None) -> Preflight:
    """The preflight of `resolved` built as `solver`, for a run over `world` processes. With
    `train.preflight` a probe measures memory and time and the micro-batch "auto" is chosen;
    without it only the work and the published GPU figures are given."""
    recipe, train, device = resolved.recipe, resolved.recipe.train, solver.device
    train_examples, test_examples = len(solver.dataset("train")), len(solver.dataset(eval_split(recipe)))
    max_steps, G = solver.halting.max_steps, train.global_batch_size
    steps = total_steps(train, train_examples, max_steps)
    n_evals = evaluations(steps, train.eval_interval)
    eval_examples = test_examples if train.eval_limit is None else min(test_examples, train.eval_limit)
    share = G // world
    setting = train.micro_batch_size
    micro = share if setting in (None, "auto") else setting
    requested_eval = train.eval_batch_size or G
    eval_rank = eval_batch_size(requested_eval, world) // world
    rollouts = 1 + sum(1 for w in dict.fromkeys(recipe.eval.guidance) if float(w) != 1.0)
    flops = run_flops(solver.cost, steps=steps, global_batch=G, evaluations=n_evals, eval_examples=eval_examples,
                      eval_steps=max_steps, rollouts=rollouts)
    common = dict(recipe=resolved.source, device=str(device), precision=solver.precision, world=world, steps=steps, global_batch=G,
                  examples=math.ceil(steps * G / max_steps), train_examples=train_examples, max_steps=max_steps,
                  evaluations=n_evals, eval_examples=eval_examples, micro_batch_setting=setting)
    anchor = nearest_anchor(solver.cost.flops_per_call) if recipe.task.name == "arc" else None
    unmeasured = dict(**common, micro_batch=micro, accumulation=share // micro, eval_batch=eval_rank * world,
                      gpus=_gpus(anchor, flops, None, batch=G, fixed=0))
    if not train.preflight:
        return Preflight(**unmeasured, unmeasured="train.preflight = false")

    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else resident_bytes()  # before the probe's own garbage
    try:
        measured = probe(solver, train_slots=micro, eval_slots=eval_rank)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # a component failing here fails the run where it would anyway, with its own message
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return Preflight(**unmeasured, unmeasured=f"the probe step failed: {reason}")
    available, source = available_memory(device, local_processes=local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    params = tensor_bytes(list(solver.backbone.parameters()), list(solver.backbone.buffers()))
    table = tensor_bytes(solver.puzzle_emb.weights) if solver.puzzle_emb is not None else 0
    ema = params if train.ema > 0 else 0

    def held(m: int) -> float:  # what stays allocated through a step of micro-batch m
        outputs = 2 * share * measured.outputs_per_slot if share // m > 1 else 0.0  # each micro-batch's, then joined
        return base + measured.optimizer + ema + share * measured.carry_per_slot + outputs

    def train_need(m: int) -> float:
        return held(m) + measured.train.at(m)

    evaluators = measured.evaluator_per_example * eval_examples  # rank 0 gathers every rank's state

    def eval_need(m: int, b: int) -> float:
        return held(m) + measured.evaluation.at(b) + evaluators

    def fits(need: float) -> bool:
        return available is None or need * HEADROOM <= available

    problem = None
    if setting == "auto":
        fitting = [d for d in _divisors(share) if fits(train_need(d))]
        micro = fitting[-1] if fitting else 1
        if train.eval_batch_size is None and not fits(eval_need(micro, eval_rank)):  # "auto" sizes evaluation too
            fitting_eval = [b for b in range(1, eval_rank + 1) if fits(eval_need(micro, b))]
            eval_rank = fitting_eval[-1] if fitting_eval else 1
    needed = max(train_need(micro), eval_need(micro, eval_rank))
    if not fits(needed):
        problem = _problem(needed, available, source, micro=micro, share=share, train_need=train_need, eval_need=eval_need,
                           eval_rank=eval_rank, world=world, fits=fits, base=base, table=table)
    step_s = share * measured.train_s_per_slot + measured.optimizer_s + measured.refill_s_per_example * share / max_steps
    train_s = steps * step_s
    eval_s = n_evals * math.ceil(eval_examples / world) * measured.eval_s_per_example * rollouts
    seconds = {"step": step_s, "train": train_s, "evaluation": eval_s, "total": train_s + eval_s}
    memory = {"built": base, "puzzle_table": table, "model": params, "optimizer": measured.optimizer, "ema": ema,
              "carry": held(micro) - base - measured.optimizer - ema, "activations": measured.train.at(micro),
              "activations_per_slot": measured.train.per_slot, "evaluation": measured.evaluation.at(eval_rank),
              "evaluators": evaluators, "training_peak": train_need(micro), "evaluation_peak": eval_need(micro, eval_rank)}
    note = None
    caveats = time_caveats(device, compiled=bool(train.compile))
    if device.type == "cpu" and seconds["total"] > 86400:
        note = (f"{in_words(seconds['total'])} on this CPU: the recipe is meant for GPUs; on this machine use "
                f"{cpu_recipe(resolved)}")
    gpus = _gpus(anchor, flops, measured if device.type != "cuda" else None, batch=G, fixed=params + table + measured.optimizer + ema)
    return Preflight(**common, micro_batch=micro, accumulation=share // micro, eval_batch=eval_rank * world,
                     memory={k: int(v) for k, v in memory.items()}, needed=int(needed), available=available,
                     available_source=source, seconds=seconds, gpus=gpus, probe_seconds=measured.seconds,
                     problem=problem, note=note, caveats=caveats)


def busy_cpu(cores: int | None = None, load: float | None = None) -> str | None:
    """A CPU already busy when the probe ran (1-minute load average above its cores): the timed
    probe then shares the cores, and its time reads long by about the share the others take."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on every platform
            return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load <= cores + 0.5:  # this process's own thread(s) count in the load too
        return None
    return (f"the CPU was busy during the probe (1-minute load {load:.1f} on {cores} core(s)): the time reads long by "
            f"about the share other work takes, and holds only while it runs")


def time_caveats(device: torch.device, *, compiled: bool) -> list[str]:
    """What the probe's time estimate cannot see. The probe runs the backbone eager (compiling
    would cost it tens of seconds), so with `train.compile` the steps run faster than probed
    once compiled; the progress bar's ETA, from the steps themselves, then says by how much."""
    found = []
    if compiled:
        found.append("the probe ran eager; with train.compile the compiled steps are faster (1.1-1.6x on the CPU "
                     "recipes, docs/results/throughput_cpu.md), after tens of seconds of compiling; the progress bar's ETA says")
    if device.type == "cpu" and (busy := busy_cpu()):
        found.append(busy)
    return found


def _problem(needed, available, source, *, micro, share, train_need, eval_need, eval_rank, world, fits, base, table) -> str:
    """Why the run cannot fit, and the settings that make it fit."""
    head = (f"the run needs about {size(needed)} per process (micro-batch {micro} slots, evaluation batch "
            f"{eval_rank * world}) and {size(available)} are available ({source}; {HEADROOM:g}x the estimate must "
            f"fit, for what the probe does not see)")
    train_fit = max((d for d in _divisors(share) if fits(train_need(d))), default=None)
    if train_fit is None:
        return (f"{head}. It does not fit even one slot at a time: the process holds {size(base)} once built (the "
                f"puzzle table {size(table)}) and a step of one slot adds {size(train_need(1) - base)}. "
                f"Use a machine with more memory, or a smaller recipe")
    fixes = []
    if train_fit < micro:
        fixes.append(f"--set train.micro_batch_size={train_fit} (the largest that fits; or \"auto\", which picks it: the "
                     f"same training, by gradient accumulation)")
    m = min(micro, train_fit)
    if not fits(eval_need(m, eval_rank)):
        eval_fit = max((b for b in range(1, eval_rank + 1) if fits(eval_need(m, b))), default=None)
        if eval_fit is None:
            return f"{head}. Evaluation does not fit even one example at a time: use a machine with more memory"
        fixes.append(f"--set train.eval_batch_size={eval_fit * world} (evaluation batches: the same metrics)")
    return f"{head}. Make it fit with {' and '.join(fixes)}"


def _gpus(anchor: Anchor | None, flops: float, measured: Probe | None, *, batch: int, fixed: float) -> dict | None:
    """The published anchor's time scaled by FLOPs to 1/4/8 of its GPUs (those that divide the
    global `batch`; assuming the run scales linearly in them), and from this machine's probe the
    memory per GPU with its share of the batch in the largest micro-batch that fits
    (activations as measured here)."""
    if anchor is None:
        return None
    gpu_seconds = anchor.hours * 3600 * anchor.gpus * flops / anchor.flops
    counts = [n for n in GPU_COUNTS if batch % n == 0]
    out = {"anchor": anchor.label(), "gpu": anchor.gpu, "hours": {n: gpu_seconds / n / 3600 for n in counts}}
    if measured is not None:
        memory, micro = {}, {}
        for n in counts:
            slots = batch // n
            carry = slots * (measured.carry_per_slot + 2 * measured.outputs_per_slot)
            fitting = [d for d in _divisors(slots) if (fixed + carry + measured.train.at(d)) * HEADROOM <= GPU_MEMORY[anchor.gpu]]
            micro[n] = fitting[-1] if fitting else None
            memory[n] = fixed + carry + measured.train.at(micro[n] or slots)
        out |= {"memory_bytes": memory, "micro_batch": micro}
    return out


def agree(pf: Preflight, device: torch.device) -> Preflight:
    """Every process runs the same micro-batch and evaluation batch (the smallest any chose),
    and all stop if one cannot fit."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
        return pf
    t = torch.tensor([pf.micro_batch, pf.eval_batch, -1.0 if pf.problem else 0.0], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    micro, eval_batch, failed = int(t[0].item()), int(t[1].item()), t[2].item() < 0
    problem = pf.problem or ("another process of the run cannot fit in its memory (its message says why)" if failed else None)
    return attrs.evolve(pf, micro_batch=micro, accumulation=pf.global_batch // pf.world // micro, eval_batch=eval_batch,
                        problem=problem)


# ------------------------------------------------------------------ what is printed


def size(n: float) -> str:
    """Bytes as a person reads them: 38 GiB, 3.7 GiB, 420 MiB, 0.3 MiB."""
    if n >= 10 * GiB:
        return f"{n / GiB:.0f} GiB"
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB"


def report(pf: Preflight, *, note: bool = True) -> list[str]:
    """The preflight as lines a person reads (`note`: with the line on a run too long here)."""
    passes = pf.examples / max(1, pf.train_examples)
    lines = [
        f"work        {pf.steps:,} optimizer steps x {pf.global_batch:,} slots: {pf.examples:,} examples "
        f"({passes:.3g} passes over {pf.train_examples:,}), each for up to {pf.max_steps} supervision steps; "
        f"{pf.evaluations:,} evaluation(s) of {pf.eval_examples:,} test examples",
    ]
    split = f"{pf.accumulation} micro-batches of {pf.micro_batch}" if pf.accumulation > 1 else f"one micro-batch of {pf.micro_batch}"
    chosen = " (auto)" if pf.micro_batch_setting == "auto" else ""
    if pf.memory:
        m = pf.memory
        ema = f", EMA {size(m['ema'])}" if m["ema"] else ""
        evaluators = f", evaluators {size(m['evaluators'])}" if m["evaluators"] >= 2**20 else ""
        lines.append(
            f"memory      needs {size(pf.needed)} per process: built {size(m['built'])} (puzzle table {size(m['puzzle_table'])}, "
            f"model {size(m['model'])}), optimizer {size(m['optimizer'])}{ema}, carry {size(m['carry'])}, activations "
            f"{size(m['activations'])} ({size(m['activations_per_slot'])} a slot); evaluation {size(m['evaluation'])} a batch "
            f"of {pf.eval_batch // pf.world}{evaluators}")
        avail = f"{size(pf.available)} ({pf.available_source})" if pf.available is not None else "unknown"
        verdict = "does NOT fit" if pf.problem else "fits"
        lines.append(f"available   {avail}: {verdict} with {split} per step{chosen}, evaluation batch {pf.eval_batch}")
        s = pf.seconds
        share = s["evaluation"] / s["total"] if s["total"] else 0.0
        where = "this GPU" if pf.device.startswith("cuda") else "this CPU"
        step = f"{s['step']:.3g}" if s["step"] < 100 else f"{s['step']:,.0f}"
        lines.append(f"time        {in_words(s['total'])} on {where} ({step} s a step; evaluation {100 * share:.0f}% of it), "
                     f"by a probe of {pf.probe_seconds:.1f} s")
        lines.extend(f"            ({caveat})" for caveat in pf.caveats)
    else:
        lines.append(f"memory      not measured ({pf.unmeasured}): {split} per step, evaluation batch {pf.eval_batch}")
    if pf.gpus:
        g = pf.gpus
        hours = ", ".join(f"{in_words(h * 3600).removeprefix('about ')} on {n}" for n, h in g["hours"].items())
        lines.append(f"GPUs        by the published figures ({g['anchor']}) scaled by FLOPs: about {hours} {g['gpu']}")
        if "memory_bytes" in g:
            per = " / ".join(size(v) for v in g["memory_bytes"].values())
            micro = " / ".join(str(v) if v else "none" for v in g["micro_batch"].values())
            lines.append(f"            memory per {g['gpu']} on {'/'.join(map(str, g['memory_bytes']))}: {per} at micro-batch {micro} "
                         f"(activations measured here, in {pf.precision}: a GPU's fused attention likely needs less)")
    if pf.note and note:
        lines.append(f"note        {pf.note}")
    if pf.problem:
        lines.append(f"stop        {pf.problem}")
    return lines
