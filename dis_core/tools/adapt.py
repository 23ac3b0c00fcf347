"""`dis adapt RUN_DIR TASKS --out DIR`: a trained model meets tasks it never saw.

A model with a puzzle embedding (TRM/DIS on ARC) has one row per (task, variant) it trained on; a
new task has none. Adaptation adds rows for the new tasks and their variants, initialises them
(`mean` of the trained rows, as the official loader does when the table's shape changes;
`zeros`; or `nearest`: per task, the trained row under which the unadapted model best reproduces
the task's demonstration outputs), trains on the new tasks' demonstration pairs only, then
evaluates their test inputs with the task's voting and writes `submission.json`.

What trains (`--train`): `embedding`, the new rows alone (the network's learning rate is 0: its
weights come out bit-identical); `full`, the rows and the whole network; `adapter`, the rows and
a low-rank update of the reasoning blocks (dis_core.step.lowrank). The rows train by the table's
sign-SGD at `--emb-lr`, the network or the adapter by the recipe's optimizer at `--lr`.

Nothing here is a second training loop: adapt writes a recipe (the trained run's, with the task
replaced by `<task>_adapt` and the [train] table set for the budget), builds its `Solver`, loads
the trained weights into it, and hands it to the `Trainer`, so checkpoints, `--resume`, signals,
the preflight and evaluation are the ones of any run. A task supports adaptation by registering a
task `<name>_adapt` whose config takes `tasks` (the TASKS path), `first_id` (the trained table's
size: new identifiers start there) and optionally `solutions`, `num_augmentations`,
`eval_variants` and `seed`; the arc task does (dis_plugins.tasks.arc.adapt_data). It may also
offer `seen_by_base(base_task_name, base_task_config) -> dict`, which the leakage report
includes.

    report = adapt("runs/arc", "arc-prize-2025/arc-agi_test_challenges.json", "runs/arc-adapted", train="embedding")
    model = load("runs/arc-adapted")          # the adapted model, a dis_core Model
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from dis_core.contract.errors import CheckpointError, UserError

if TYPE_CHECKING:  # torch is imported where it is used: `dis --help` stays fast
    import torch

log = structlog.get_logger()
MODES = ("embedding", "full", "adapter")
INITS = ("mean", "zeros", "nearest")
ABLATIONS = ("blank", "random")
REPORT = "adapt.json"


def _one_of(choices):
    def check(_inst, attr, value):
        if value not in choices:
            raise UserError(f"adapt: {attr.name} must be one of {', '.join(choices)}, not {value!r}")
    return check


def _positive(_inst, attr, value):
    if value is not None and (isinstance(value, bool) or value <= 0):
        raise UserError(f"adapt: {attr.name} must be positive, got {value!r}")


def _non_negative(_inst, attr, value):
    if value is not None and (isinstance(value, bool) or value < 0):
        raise UserError(f"adapt: {attr.name} must be >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class AdaptOptions:
    """What `dis adapt` does; every field is a command-line option of the same name."""

    train: str = attrs.field(default="embedding", validator=_one_of(MODES))  # what trains besides nothing
    init: str = attrs.field(default="mean", validator=_one_of(INITS))  # the new rows' first value
    steps: int = attrs.field(default=100, validator=_positive)  # optimizer steps (the budget)
    minutes: float | None = attrs.field(default=None, validator=_positive)  # or/and a wall-time budget
    batch_size: int = attrs.field(default=16, validator=_positive)  # examples per step
    emb_lr: float | None = attrs.field(default=None, validator=_non_negative)  # rows' sign-SGD rate; default: the run's
    emb_weight_decay: float = attrs.field(default=0.0, validator=_non_negative)  # none: few steps, few rows
    lr: float = attrs.field(default=1e-4, validator=_non_negative)  # the network's (full) or the adapter's rate
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    adapter_rank: int = attrs.field(default=4, validator=_positive)
    adapter_modules: tuple[str, ...] = ("net.", "H.", "L.")  # prefixes of the adapted nn.Linear layers (trm, hrm)
    num_augmentations: int = attrs.field(default=8, validator=_non_negative)  # variants per new task
    eval_variants: int | None = attrs.field(default=None, validator=_positive)  # variants voted per test pair
    nearest_candidates: int = attrs.field(default=16, validator=_positive)  # trained rows tried per task (init nearest)
    ablations: tuple[str, ...] = ()  # "blank", "random": evaluate again with the new rows replaced
    solutions: str | None = None  # test outputs (Kaggle layout), to score the run
    checkpoint_interval: int = attrs.field(default=0, validator=_non_negative)
    seed: int = attrs.field(default=0, validator=_non_negative)
    threads: int | None = attrs.field(default=None, validator=_positive)

    def __attrs_post_init__(self):
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise UserError(f"adapt: ablation {bad[0]!r} is not one of {', '.join(ABLATIONS)}")


# ------------------------------------------------------------------ the recipe


def adapt_recipe(base, registry, tasks: Path, first_id: int, opts: AdaptOptions, source: Path):
    """The trained run's resolved recipe `base` turned into the adaptation's: the task
    `<name>_adapt` over TASKS, [train] set for the budget, no trackers, no EMA (an average over a
    few hundred steps would mostly keep the unadapted weights)."""
    from dis_core.contract.errors import UnknownComponentError
    from dis_core.wiring.recipe import resolve

    data = base.to_dict()
    name = data["task"]["name"]
    try:
        registry.get("task", f"{name}_adapt")
    except UnknownComponentError:
        raise UserError(f"the run's task {name!r} cannot be adapted to new tasks: no task {name + '_adapt'!r} is "
                        f"registered (dis adapt works on ARC runs; a task plugin adds it, see docs/adapt.md)") from None
    cfg: dict[str, Any] = {"tasks": str(Path(tasks).expanduser().absolute()), "first_id": first_id,
                           "num_augmentations": opts.num_augmentations}
    if "seed" in data["task"].get("config", {}):
        cfg["seed"] = data["task"]["config"]["seed"]  # the variants of a task as the run drew them
    if "canvas" in data["task"].get("config", {}):
        cfg["canvas"] = data["task"]["config"]["canvas"]  # the model's sequence: the grids on its canvas
    if opts.eval_variants is not None:
        cfg["eval_variants"] = opts.eval_variants
    if opts.solutions is not None:
        cfg["solutions"] = str(Path(opts.solutions).expanduser().absolute())
    data["task"] = {"name": f"{name}_adapt", "config": cfg}
    data["description"] = f"dis adapt ({opts.train}, init {opts.init}) of a {name} run to the tasks of {Path(tasks).name}"
    data["loggers"] = []
    t = data["train"]
    for key in ("epochs", "keep_best", "eval_limit", "micro_batch_size"):
        t.pop(key, None)
    frozen = opts.train == "embedding"
    t.update(steps=opts.steps, global_batch_size=opts.batch_size, eval_interval=0, checkpoint_interval=opts.checkpoint_interval,
             keep_checkpoints=2, seed=opts.seed, ema=0.0, log_interval=max(1, min(10, opts.steps // 10)),
             puzzle_emb_lr=opts.emb_lr if opts.emb_lr is not None else t.get("puzzle_emb_lr", 1e-2),
             puzzle_emb_weight_decay=opts.emb_weight_decay, schedule={"warmup_steps": 0, "decay": "constant"})
    if t.get("eval_batch_size") is None or t["eval_batch_size"] > 256:
        t["eval_batch_size"] = max(opts.batch_size, 64)
    if opts.threads is not None:
        t["threads"] = opts.threads
    optimizer = t.setdefault("optimizer", {"name": "adamw"})
    conf = optimizer.setdefault("config", {})
    if "lr" not in conf or "weight_decay" not in conf:
        raise UserError(f"the run's optimizer {optimizer.get('name')!r} has no lr and weight_decay to set for adaptation")
    # Embedding only: the optimizer keeps the network where it is (rate 0 and no decay: AdamW's
    # update is then exactly zero), the rows move by the table's own sign-SGD.
    conf.update(lr=0.0 if frozen else opts.lr, weight_decay=0.0 if frozen else opts.weight_decay)
    return resolve(data, registry, source=str(source), base_dir=Path.cwd())


# ------------------------------------------------------------------ the new rows


def _backbone_weights(saved: dict) -> dict:
    from dis_core.tools.inference import _backbone_state

    return _backbone_state(saved["ema"] if saved.get("ema") is not None else saved["module"])


def init_rows(solver, base_table: torch.Tensor, how: str, *, candidates: int = 16, seed: int = 0) -> dict:
    """Copy the trained rows into the solver's (larger) table and set the new ones; returns what
    was done (for the report)."""
    import torch

    table = solver.puzzle_emb.weights
    first = base_table.shape[0]
    with torch.no_grad():
        table[:first] = base_table.to(table.device)
        trained = base_table[1:] if first > 1 else base_table  # row 0 is the blank one, never trained
        if how == "mean":
            table[first:] = trained.mean(0).to(table.device)
            return {"init": "mean", "over_rows": int(trained.shape[0])}
        if how == "zeros":
            table[first:] = 0
            return {"init": "zeros"}
        return _nearest(solver, first, candidates, seed)


def _groups_batch(solver):
    """One batch holding, per group of the train split (a new task), its examples in one variant,
    and the new rows each group owns."""
    from dis_core.step.data import to_torch
    import numpy as np

    train = solver.dataset("train")
    g = train.groups()
    starts = np.asarray(g.puzzle_start)
    sizes = np.asarray(g.puzzle_size)
    offsets = np.asarray(g.group_offsets)
    first_ex = [np.arange(starts[offsets[k]], starts[offsets[k]] + sizes[offsets[k]]) for k in range(len(offsets) - 1)]
    batch = to_torch(train.get(np.concatenate(first_ex)))
    owner = np.repeat(np.arange(len(first_ex)), [len(e) for e in first_ex])
    # Every (group, variant) puzzle's row: its first example's identifier.
    rows = to_torch(train.get(starts[: offsets[-1]]))["puzzle_ids"]
    row_group = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return batch, owner, rows, row_group


def _nearest(solver, first: int, candidates: int, seed: int) -> dict:
    """Per new task, the trained row under which the unadapted model's answers to the task's
    demonstration inputs match their outputs best (cell accuracy), among `candidates` rows drawn
    at random (the same for every task)."""
    import torch

    import numpy as np

    from dis_core.contract.interfaces import IGNORE

    batch, owner, rows, row_group = _groups_batch(solver)
    n_groups = int(row_group.max()) + 1 if len(row_group) else 0
    gen = torch.Generator().manual_seed(seed)
    pool = torch.arange(1, first) if first > 1 else torch.arange(first)
    tried = pool[torch.randperm(len(pool), generator=gen)[:candidates]].tolist()
    batch = {k: v.to(solver.device) for k, v in batch.items()}
    labels = batch["labels"]
    mask = labels != IGNORE
    scores = np.zeros((len(tried), n_groups))
    with solver.evaluating(), torch.no_grad():
        for c, row in enumerate(tried):
            b = dict(batch, puzzle_ids=torch.full_like(batch["puzzle_ids"], row))
            preds = solver.rollout(b).preds[:, -1]
            acc = (((preds == labels) & mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy()
            scores[c] = np.bincount(owner, weights=acc, minlength=n_groups) / np.maximum(np.bincount(owner, minlength=n_groups), 1)
    best = scores.argmax(0) if len(tried) else np.zeros(n_groups, dtype=int)
    table = solver.puzzle_emb.weights
    with torch.no_grad():
        for r, gr in zip(rows.tolist(), row_group.tolist()):
            table[r] = table[tried[best[gr]]]
    return {"init": "nearest", "candidates": tried, "chosen_per_task": [tried[b] for b in best.tolist()],
            "demo_cell_accuracy_of_chosen": [round(float(scores[b, k]), 4) for k, b in enumerate(best.tolist())]}


def set_trainable(solver, mode: str, opts: AdaptOptions) -> dict:
    """requires_grad per mode (the Trainer's optimizer takes the parameters that require it);
    the adapter is attached here. Returns counts for the report."""
    from dis_core.step.lowrank import add_low_rank

    backbone = solver.backbone
    if mode == "adapter":
        try:
            add_low_rank(backbone, rank=opts.adapter_rank, prefixes=tuple(opts.adapter_modules))
        except ValueError as exc:
            raise UserError(f"--train adapter: {exc}") from None
    solver.step_module()  # it freezes what the loss never reaches (an unused halting head): those stay frozen
    live = {name for name, p in backbone.named_parameters() if p.requires_grad}
    params = list(backbone.named_parameters())
    for name, p in params:
        p.requires_grad_(mode == "full" or (mode == "adapter" and name.startswith("lowrank_adapter.")))
    if mode == "embedding":
        # DeepSpeed's engine needs one parameter with a gradient; the optimizer's rate is 0, so
        # it does not move (the network's other weight gradients are not even computed).
        min((kv for kv in params if kv[0] in live), key=lambda kv: kv[1].numel())[1].requires_grad_(True)
    trainable = sum(p.numel() for _, p in params if p.requires_grad and (mode != "embedding"))
    return {"network_params": sum(p.numel() for _, p in params if not _.startswith("lowrank_adapter.")),
            "trained_network_params": trainable}


# ------------------------------------------------------------------ the run


def _registry(registry):
    if registry is not None:
        return registry
    from dis_core.wiring.plugins import load_registry

    return load_registry()


def adapt(source: str | Path, tasks: str | Path | None, out: str | Path, *, registry=None, data_dir: str | Path = "data",
          device: str | torch.device | None = None, resume: bool = False, command: str = "", **options) -> dict:
    """Adapt the trained run (or checkpoint, or a Model that `dis_core.load` returned) `source` to
    the tasks `tasks` in the run directory `out`; returns the report also written to
    `out/adapt.json`. `options`: `AdaptOptions` fields. `resume=True` continues `out` (source, tasks
    and options come from its adapt.json; `steps` and `minutes` may be raised)."""
    import torch

    if hasattr(source, "checkpoint") and hasattr(source, "solver"):  # a loaded Model: its checkpoint, registry, device
        registry = registry if registry is not None else source.registry
        device = device if device is not None else source.device
        data_dir = source.data_dir if data_dir == "data" else data_dir
        source = source.checkpoint

    from dis_core.loop import engine as dist
    from dis_core.loop.trainer import Trainer
    from dis_core.outputs.rundir import open_run_dir, release_lock
    from dis_core.step.solver import Solver
    from dis_core.tools.inference import locate_and_read, run_precision
    from dis_core.wiring.recipe import load_recipe

    out = Path(out)
    registry = _registry(registry)
    if resume:
        info = _read_report(out)
        given = {k: v for k, v in options.items() if k in ("steps", "minutes")}
        options = {**info["options"], **given}
        source, tasks = info["base"]["source"], info["tasks"]
    elif tasks is None:
        raise UserError("adapt: TASKS is required (a *_challenges.json, a folder of task files or one task file)")
    opts = AdaptOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    if not Path(tasks).expanduser().exists():
        raise UserError(f"{tasks}: no such TASKS file or folder")
    run_dir, ckpt_dir, saved = locate_and_read(source)
    if saved.get("puzzle_emb") is None:
        raise UserError(f"{ckpt_dir}: the model has no puzzle embedding table, so there are no per-task rows to add; "
                        f"dis adapt needs a run whose backbone has puzzle_emb_ndim > 0 (ARC TRM/DIS runs)")
    base_table = saved["puzzle_emb"]["weights"].float()
    base = load_recipe(run_dir / "recipe.toml", registry, ["loggers=[]", *run_precision(run_dir)])
    resolved = adapt_recipe(base, registry, Path(tasks), base_table.shape[0], opts, out / "recipe.toml")
    device = torch.device(device) if device is not None else dist.pick_device()
    started = time.perf_counter()
    open_run_dir(out, resume=resume, command=command)
    try:
        solver = Solver.build(resolved, registry, Path(data_dir), device=device)
        if solver.puzzle_emb is None:
            raise CheckpointError(f"{run_dir}: the recipe's backbone takes no puzzle embedding, but the checkpoint holds a table")
        task = solver.task
        leakage = _base_leakage(task, base)
        init = {"init": opts.init, "restored": True}
        if not resume:
            from dis_core.tools.inference import _load_into

            _load_into(solver.backbone, _backbone_weights(saved), ckpt_dir, "backbone")
            init = init_rows(solver, base_table, opts.init, candidates=opts.nearest_candidates, seed=opts.seed)
        counts = set_trainable(solver, opts.train, opts)
        new_rows = solver.puzzle_emb.num_ids - base_table.shape[0]
        report = {
            "base": {"source": str(source), "run_dir": str(run_dir), "checkpoint": str(ckpt_dir), "step": saved.get("step"),
                     "weights": "ema" if saved.get("ema") is not None else "trained", "table_rows": int(base_table.shape[0])},
            "tasks": str(Path(tasks).expanduser().absolute()), "options": attrs.asdict(opts),
            "new_rows": int(new_rows), "new_tasks": len(getattr(task, "test_puzzles", []) or []),
            "scored": bool(getattr(task, "scored", False)), "leakage": leakage, **counts,
        }
        if not resume:
            report["init"] = init
        else:
            report["init"] = _read_report(out).get("init", init)
        _say(report)
        trainer = Trainer(resolved, registry, out, data_dir=Path(data_dir), resume=resume, command=command, solver=solver,
                          max_wall_s=opts.minutes * 60 if opts.minutes else None)
        _write_report(out, report)  # before training: a killed run still says what it was
        summary = trainer.fit(registry)
    finally:
        release_lock(out)
    report["metrics"] = {k: v for k, v in summary.items() if "/" in k and not k.startswith("cost/")}
    report["cost"] = {k: v for k, v in summary.items() if k.startswith("cost/")} | {"steps": summary.get("step"),
                                                                                   "seconds_this_session": time.perf_counter() - started}
    report["submission"] = _copy_submission(out)
    if opts.ablations:
        report["ablations"] = ablate(out, opts.ablations, base_table, registry=registry, device=device, data_dir=data_dir,
                                     seed=opts.seed)
    _write_report(out, report)
    return report


def _base_leakage(task, base) -> dict:
    """What the trained model saw of the new tasks (by id and by content), and the guard in force."""
    seen = getattr(task, "seen_by_base", None)
    name, cfg = base.component("task")
    base_cfg = base.to_dict()["task"].get("config", {})
    checked = seen(name, base_cfg) if seen is not None else {"checked": False, "why": f"task {name!r} offers no check"}
    if not checked.get("checked"):
        checked.update(_ids_in_reference(task, base_cfg))
    return {"training_uses": "demonstration pairs of the new tasks only; test pairs are refused batch by batch (leakage guard)",
            "base_saw": checked}


def _ids_in_reference(task, base_cfg: dict) -> dict:
    """For a base read from a reference build (an imported official checkpoint), the part that
    can be checked: its identifiers.json names every task its table has a row for (`name` or
    `name|||variant`), so a new task id found there was trained on by id (the official setup
    trains on the evaluation tasks' demonstrations). Pairs cannot be compared: the build holds
    encoded, augmented grids."""
    ref = base_cfg.get("reference_dir")
    ids = [t for t, _ in getattr(task, "test_puzzles", ())]
    if not ref or not ids:
        return {}
    try:
        names = json.loads((Path(ref) / "identifiers.json").read_text())
    except (OSError, ValueError):
        return {"ids_checked": False}
    trained = {str(n).split("|||")[0] for n in names}
    return {"ids_checked": True, "tasks_with_id_in_table": sorted(t for t in ids if t in trained)}


def _say(report: dict) -> None:
    seen = report["leakage"]["base_saw"]
    lines = [f"adapt: {report['new_tasks']} new task(s), {report['new_rows']} new row(s) after {report['base']['table_rows']} "
             f"trained ones; training {report['options']['train']} (init {report['options']['init']})",
             "leakage guard: training batches hold demonstration pairs only; a test pair in a batch stops the run"]
    if seen.get("checked"):
        lines.append(f"base model saw: task ids of {len(seen['tasks_with_id_trained'])}, demonstration pairs of "
                     f"{len(seen['tasks_with_demos_seen'])}, a test pair (input and output) of {len(seen['tasks_with_test_pair_seen'])} "
                     f"new task(s)")
        if seen["tasks_with_test_pair_seen"]:
            log.warning("the base model trained on test pairs of tasks being adapted: their scores are not held out",
                        tasks=seen["tasks_with_test_pair_seen"][:5])
    else:
        lines.append(f"base model saw: not checked ({seen.get('why')})")
        if seen.get("ids_checked"):
            lines.append(f"  by task id (the reference build's identifiers.json): {len(seen['tasks_with_id_in_table'])} "
                         f"new task(s) have rows in the base table: {', '.join(seen['tasks_with_id_in_table'][:5]) or 'none'}")
    if not report["scored"]:
        lines.append("no test outputs known for some tasks: pass@K is not a score here; submission.json is the result")
    print("\n".join(lines), file=sys.stderr)


def _read_report(out: Path) -> dict:
    try:
        return json.loads((out / REPORT).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--resume: {out / REPORT} not found; is {out} a dis adapt run?") from None
    except ValueError as exc:
        raise UserError(f"--resume: {out / REPORT} is not readable JSON ({exc})") from None


def _write_report(out: Path, report: dict) -> None:
    from dis_core.outputs.rundir import atomic_write

    atomic_write(out / REPORT, json.dumps(report, indent=2, default=str) + "\n")


def _copy_submission(out: Path) -> str | None:
    """The last evaluation's submission.json, copied to OUT/submission.json."""
    found = sorted((out / "eval").glob("step_*/*/submission.json"), key=lambda p: int(p.parent.parent.name[5:]))
    if not found:
        return None
    shutil.copyfile(found[-1], out / "submission.json")
    return str(out / "submission.json")


# ------------------------------------------------------------------ using the adapted model


def load(out: str | Path, *, registry=None, device=None, data_dir: str | Path = "data"):
    """The adapted model of the run directory `out` (its newest checkpoint), a dis_core Model;
    with the adapter attached when it trained one."""
    import torch

    from dis_core.loop import engine as dist
    from dis_core.step.lowrank import add_low_rank
    from dis_core.step.solver import Solver
    from dis_core.tools.inference import Model, locate_and_read, run_precision
    from dis_core.wiring.recipe import load_recipe

    out = Path(out)
    info = _read_report(out)
    registry = _registry(registry)
    run_dir, ckpt_dir, saved = locate_and_read(out)
    resolved = load_recipe(run_dir / "recipe.toml", registry, ["loggers=[]", *run_precision(run_dir)])
    solver = Solver.build(resolved, registry, Path(data_dir), device=torch.device(device) if device else dist.pick_device())
    opts = info["options"]
    if opts["train"] == "adapter":
        add_low_rank(solver.backbone, rank=opts["adapter_rank"], prefixes=tuple(opts["adapter_modules"]))
    return Model(solver=solver, resolved=resolved, registry=registry, saved=saved, run_dir=run_dir, checkpoint=ckpt_dir,
                 data_dir=Path(data_dir), overrides=(), weights="auto")


def ablate(out: Path, which, base_table: torch.Tensor, *, registry=None, device=None, data_dir="data", seed: int = 0) -> dict:
    """Evaluate the adapted model again with its new rows replaced: `blank` (the table's row 0,
    which no example trains) or `random` (a trained row of another task, drawn per row); how much
    the rows carry is the drop from the adapted metrics."""
    import torch

    model = load(out, registry=registry, device=device, data_dir=data_dir)
    table = model.solver.puzzle_emb.weights
    first = base_table.shape[0]
    kept = table[first:].clone()
    results = {}
    for kind in which:
        with torch.no_grad():
            if kind == "blank":
                table[first:] = table[0]
            else:
                gen = torch.Generator().manual_seed(seed)
                pick = torch.randint(1, max(first, 2), (table.shape[0] - first,), generator=gen)
                table[first:] = base_table[pick.clamp(max=first - 1)].to(table.device)
        metrics = model.evaluate(out_dir=out / "ablation" / kind)
        results[kind] = {k: v for k, v in metrics.items() if "/" in k}
        with torch.no_grad():
            table[first:] = kept
    return results


def adapt_model(model, tasks, out, **options) -> dict:
    """`adapt` from a loaded `dis_core.load` Model (kept for callers of the first version)."""
    return adapt(model, tasks, out, **options)


# ------------------------------------------------------------------ the command


def add_parsers(sub) -> None:
    p = sub.add_parser("adapt", help="add rows for unseen tasks to a trained ARC model, train on their demonstrations, "
                                      "vote, write submission.json (docs/adapt.md)")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained run directory (or RUN_DIR/checkpoints/step_N)")
    p.add_argument("tasks", type=Path, metavar="TASKS", nargs="?", default=None,
                   help="a Kaggle *_challenges.json, a folder of task .json files, or one task file (not needed with --resume)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the adaptation's run directory")
    d = AdaptOptions()
    p.add_argument("--train", choices=MODES, default=d.train, help="what trains: the new rows (embedding), rows + network "
                   "(full), rows + a low-rank adapter of the reasoning blocks (adapter)")
    p.add_argument("--init", choices=INITS, default=d.init, help="the new rows' start: mean trained row, zeros, nearest trained row")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps}; with --resume, the run's)")
    p.add_argument("--minutes", type=float, default=None, help="and/or a wall-time budget")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--emb-lr", type=float, default=None, help="the rows' sign-SGD rate (default: the run's puzzle_emb_lr)")
    p.add_argument("--lr", type=float, default=d.lr, help="the network's (full) or the adapter's learning rate")
    p.add_argument("--adapter-rank", type=int, default=d.adapter_rank)
    p.add_argument("--augmentations", dest="num_augmentations", type=int, default=d.num_augmentations,
                   help="augmentation variants per new task, each with its own row")
    p.add_argument("--eval-variants", type=int, default=None, help="variants voted per test pair (default all)")
    p.add_argument("--solutions", default=None, help="the test outputs (Kaggle *_solutions.json) to score the run")
    p.add_argument("--ablation", default="", help="comma-separated: blank, random (evaluate with the new rows replaced)")
    p.add_argument("--checkpoint-interval", type=int, default=0)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads on a CPU")
    p.add_argument("--resume", action="store_true", help="continue the adaptation in --out (after a kill or Ctrl-C)")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the GPU if any)")


def cmd_adapt(args) -> int:
    options = {"train": args.train, "init": args.init, "steps": args.steps or AdaptOptions().steps, "minutes": args.minutes, "batch_size": args.batch_size,
               "emb_lr": args.emb_lr, "lr": args.lr, "adapter_rank": args.adapter_rank, "num_augmentations": args.num_augmentations,
               "eval_variants": args.eval_variants, "solutions": args.solutions, "checkpoint_interval": args.checkpoint_interval,
               "seed": args.seed, "threads": args.threads,
               "ablations": tuple(a.strip() for a in args.ablation.split(",") if a.strip())}
    if args.resume:  # the stored options stand; only the budget may grow
        options = {**({"steps": args.steps} if args.steps else {}), **({"minutes": args.minutes} if args.minutes else {})}
    report = adapt(args.run_dir, args.tasks, args.out, data_dir=args.data_dir, device=args.device, resume=args.resume,
                   command=" ".join(sys.argv), **options)
    shown = {"metrics": {k: round(v, 4) for k, v in report.get("metrics", {}).items() if "pass@" in k or "accuracy" in k},
             "submission": report.get("submission"), "ablations": report.get("ablations"),
             "steps": report["cost"].get("steps"), "wall_s": round(report["cost"].get("cost/wall_time_s", 0.0), 1)}
    print(json.dumps(shown, indent=2, default=str))
    return 0


COMMANDS = {"adapt": cmd_adapt}
