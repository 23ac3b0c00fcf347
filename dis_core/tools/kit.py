"""`dis check` and `dis show`: a plugin author's view of a recipe, without training it.

`check_recipe` builds everything on a tiny batch in a temporary run directory and runs each
component once, through the boundary checks of `dis_core.contract.checks` and the contracts of
`dis_core.testing`: the task's batches, the target generator, the backbone, the halting strategy,
the optimizer, one training supervision step (forward, backward, optimizer step), one evaluation
rollout and every evaluator on it. One `Row` per component; nothing is trained past that step.

`show_examples` prints examples with the target path their generator gives them, as grids
(`spec.grid_shape`) or rows of tokens, marking the cells each frame changes: what an author of a
plan file (docs/plan_format.md) or of a generator needs to see. Cells read as the task draws them
(the `text` of its `render_grid`: queens, digits), else as token ids.

Both choose their examples as trajectory pictures do (`dis_core.outputs.selection.Choice`, `--examples`),
by default `hardest`: those with the most cells of the question to change, so that a target path
has steps to show (the first examples of a split can be one puzzle's augmented copies with a single
cell to fill, whose path is flat).
"""

from __future__ import annotations

import copy
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import torch

from dis_core import testing
from dis_core.contract.checks import Boundary, Who, check_metrics
from dis_core.contract.compat import headline_of
from dis_core.step.data import fetch
from dis_core.step.diagnostics import hamming_to_labels, target_report
from dis_core.loop.evaluation import compute_into
from dis_core.contract.errors import DisError, UserError
from dis_core.contract.interfaces import IGNORE, EvalRecord, RenderableTask
from dis_core.outputs.selection import Choice, pick


@attrs.frozen
class Row:
    """One component's result: `problem` is None when it passed; `note` says what was run."""

    kind: str
    name: str
    plugin: str | None
    problem: str | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None


def _run(who: Who, fn: Callable[[], str], needs: dict[str, bool], rows: list[Row]) -> bool:
    """Run one check; its Row goes to `rows`. True when it passed."""
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        rows.append(Row(who.kind, who.name, who.plugin, f"skipped: needs {', '.join(missing)}, which failed"))
        return False
    try:
        note = fn()
    except (AssertionError, DisError) as exc:
        rows.append(Row(who.kind, who.name, who.plugin, str(exc) or type(exc).__name__))
        return False
    except Exception as exc:  # a raw error from the plugin's code: name it, do not crash the report
        rows.append(Row(who.kind, who.name, who.plugin, f"{type(exc).__name__}: {exc}"))
        return False
    rows.append(Row(who.kind, who.name, who.plugin, None, note or ""))
    return True


def tiny(resolved, batch_size: int = 4):
    """The recipe with a batch of `batch_size` (or the recipe's, if smaller) and one step."""
    train = resolved.recipe.train
    B = min(train.global_batch_size, batch_size)
    train = attrs.evolve(train, global_batch_size=B, micro_batch_size=None, eval_batch_size=B, eval_limit=B,
                         steps=1, epochs=None)
    return attrs.evolve(resolved, recipe=attrs.evolve(resolved.recipe, train=train))


def choice(examples, command: str) -> Choice:
    """`--examples` for `dis show` and `dis check` (default `hardest`); `failures` needs a model."""
    chosen = Choice.parse(examples, default="hardest")
    if chosen.how == "failures":
        raise UserError(f"--examples failures: dis {command} runs no trained model, so nothing fails yet; pictures of a "
                        f"trained model's failures: dis eval RUN_DIR --trajectories N --examples failures")
    return chosen


def _spelled(chosen: Choice) -> str:
    """The choice as `--examples` takes it."""
    if chosen.how == "ids":
        return "ids:" + ",".join(map(str, chosen.ids))
    return chosen.how + (f":{chosen.seed}" if chosen.seed else "")


def _positive(value: int, flag: str) -> None:
    if value < 1:
        raise UserError(f"{flag} {value}: must be a positive number of examples")


# The kinds `dis check` runs a check of its own on; every other component of a recipe (loggers, a
# kind a plugin's slot table adds) gets a row saying it was built and what it is.
CHECKED_KINDS = ("task", "target_generator", "backbone", "halting", "optimizer", "evaluator")


def check_recipe(resolved, registry, *, data_dir: Path = Path("data"), batch_size: int = 4, examples=None) -> list[Row]:
    """Build the recipe and run every component once on a tiny batch; one Row per component.
    `examples` chooses the training examples of the target check (see `choice`). The training
    step and the evaluation rollout run on the recipe's device and in its precision."""
    from dis_core.outputs.rundir import release_lock
    from dis_core.step.solver import Solver
    from dis_core.loop.trainer import Trainer

    _positive(batch_size, "--batch")
    chosen = choice(examples, "check")
    resolved = tiny(resolved, batch_size)
    recipe = resolved.recipe
    n_sup, seed = recipe.supervision.n_sup, recipe.train.seed
    placed = list(resolved.components())  # (slot, recipe path, spec) of every component, in slot order
    who = {path: Who.of(registry, slot.kind, spec.name) for slot, path, spec in placed}
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="dis-check-"))
    run_dir = tmp / "run"
    try:
        try:
            solver = Solver.build(resolved, registry, data_dir)
            trainer = Trainer(resolved, registry, run_dir, solver=solver)
        except DisError as exc:  # a factory, a Protocol, a combination of components
            return [Row("build", resolved.source, None, str(exc))]
        comp, boundary = solver.components, solver.boundary
        task, spec = comp.task, comp.task.spec
        ok: dict[str, bool] = {}
        state: dict = {}

        if chosen.how == "ids":  # an id beyond the split is the user's mistake (exit 2), not a failing task
            try:
                train_set = task.dataset("train")
                len(train_set)
            except Exception:  # the task check below reports it
                train_set = None
            if train_set is not None:
                pick(train_set, batch_size, chosen)

        def task_check() -> str:
            train, test = task.dataset("train"), task.dataset("test")
            # The first batch first: a broken `get` is reported on a batch of `batch_size`.
            first = fetch(train, np.arange(min(len(train), batch_size)), check=boundary.batch)
            state["train"] = first if chosen.how == "first" else fetch(train, pick(train, batch_size, chosen, check=boundary.batch),
                                                                        check=boundary.batch)
            state["test"] = fetch(test, np.arange(min(len(test), batch_size)), check=boundary.batch)
            testing.check_task(task, n_sup=n_sup)
            return f"{len(train)} train / {len(test)} test examples, seq_len {spec.seq_len}, vocab_size {spec.vocab_size}"

        def targets_check() -> str:
            batch = state["train"]
            frames = boundary.frames(comp.targets(batch, n_sup, torch.Generator().manual_seed(seed)), batch)
            testing.check_target_generator(comp.targets, task, n_sup=n_sup, final_is_labels=False)
            report = target_report(frames, batch["labels"])
            path = " ".join(f"{report[f'hamming@{s}']:.3g}" for s in range(1, n_sup + 1))
            ids = ", ".join(map(str, batch["example_ids"].tolist()))
            note = f"distance to y* by step: {path} (train examples {ids}; --examples {_spelled(chosen)})"
            if report["final_distance"] > 0:
                note += "; warning: the last frame is not y* (see 'dis show')"
            return note

        def backbone_check() -> str:
            testing.check_backbone(copy.deepcopy(comp.backbone).cpu(), spec, n_sup=n_sup)
            calls, grad_calls = comp.backbone.calls_per_step()
            params = sum(p.numel() for p in comp.backbone.parameters())
            return f"{params:,} parameters, {calls} network calls per step ({grad_calls} with gradient)"

        def halting_check() -> str:
            testing.check_halting(comp.halting, n_sup=n_sup)
            return f"max_steps {comp.halting.max_steps}, q-head {'used' if comp.halting.uses_q_head else 'unused'}"

        def optimizer_check() -> str:
            testing.check_optimizer(comp.make_optimizer)
            return "make(params) builds an optimizer that lowers a small loss"

        def built_check(slot, path) -> Callable[[], str]:
            def check() -> str:  # the registry checked its Protocol when it was built
                protocol = slot.interface()
                return f"built: a {type(comp.by_path[path]).__name__}, a {getattr(protocol, '__name__', protocol)}"
            return check

        def train_check() -> str:
            out = trainer.train_step()
            if out is None or not bool(torch.isfinite(out.loss.detach()).all()):
                raise AssertionError("the training step's loss or gradient is not finite")
            bad = [n for n, p in solver.backbone.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
            if bad:
                raise AssertionError(f"the optimizer step left non-finite parameters: {', '.join(bad[:3])}")
            return (f"loss {float(out.loss.detach()):.4f} on {recipe.train.global_batch_size} slots in {solver.precision}: "
                    f"forward, backward, optimizer step ({', '.join(out.losses)})")

        @torch.inference_mode()
        def eval_check() -> str:
            batch = {k: v.to(solver.device) for k, v in state["test"].items()}
            with solver.evaluating():
                out = solver.rollout(batch, generator=torch.Generator().manual_seed(seed))
            state["record"] = EvalRecord(batch={k: v.cpu() for k, v in batch.items()}, preds=out.preds.cpu(),
                                         q_halt=out.q_halt.cpu(), steps=out.steps.cpu())
            return f"{len(out.steps)} test examples in {solver.precision}, steps run {out.steps.tolist()}"

        ok["task"] = _run(who["task"], task_check, {}, rows)
        ok["target generator"] = _run(who["targets"], targets_check, {"task": ok["task"]}, rows)
        ok["backbone"] = _run(who["backbone"], backbone_check, {}, rows)
        ok["halting"] = _run(who["halting"], halting_check, {}, rows)
        ok["optimizer"] = _run(who["train.optimizer"], optimizer_check, {}, rows)
        for slot, path, _ in placed:
            if slot.kind not in CHECKED_KINDS:
                ok[path] = _run(who[path], built_check(slot, path), {}, rows)
        ok["training step"] = _run(Who("step", "training"), train_check, {k: ok[k] for k in ok}, rows)
        needs = {"task": ok["task"], "backbone": ok["backbone"], "halting": ok["halting"]}
        ok["evaluation"] = _run(Who("step", "evaluation"), eval_check, needs, rows)
        for path, name in zip((p for s, p, _ in placed if s.kind == "evaluator"), comp.evaluators):
            ev = comp.evaluators[name]
            out_dir = tmp / "eval" / name

            def evaluator_check(ev=ev, who=who[path], out_dir=out_dir) -> str:
                ev.reset()
                ev.update(state["record"])
                metrics = check_metrics(compute_into(ev, [pickle.loads(pickle.dumps(ev.state()))], out_dir), who)
                testing.check_evaluator(ev, task, out_dir=out_dir / "contract")
                headline = headline_of(ev)
                head = metrics.get(headline) if headline else None
                return f"{headline} = {head:.4g} after one step" if head is not None else f"metrics: {', '.join(metrics)}"

            _run(who[path], evaluator_check, {"evaluation": ok["evaluation"]}, rows)
        return rows
    finally:
        release_lock(run_dir)
        shutil.rmtree(tmp, ignore_errors=True)


def format_rows(rows: list[Row]) -> str:
    """One line per component: kind, name, plugin, ok or FAIL, and the note or the problem."""
    table = [(r.kind, r.name, r.plugin or "-", "ok" if r.ok else "FAIL", r.note if r.ok else r.problem) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t[:3], widths)) + f"  {t[3]:4s}  {t[4]}" for t in table]
    failed = sum(not r.ok for r in rows)
    lines.append(f"{len(rows) - failed} of {len(rows)} checks passed" if failed else f"all {len(rows)} checks passed")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ dis show


def _shown(values: np.ndarray, text: list[str] | None = None) -> list[str]:
    """One string per cell: the task's `text` for it, else the token id; IGNORE as '.'."""
    return ["." if v == IGNORE else text[k] if text is not None else str(v) for k, v in enumerate(values.tolist())]


def _cells(shown: list[str], changed: np.ndarray, width: int) -> list[str]:
    """Each cell right-aligned, then '*' when changed."""
    return [v.rjust(width) + ("*" if c else " ") for v, c in zip(shown, changed.tolist())]


def cell_text(task, tokens: np.ndarray, question: np.ndarray | None) -> list[str] | None:
    """The task's own text for each cell (its `render_grid`'s `text`; an empty cell as '·'), or
    None when it draws no text for every cell (colours only, a larger canvas)."""
    if not isinstance(task, RenderableTask):
        return None
    tokens = np.asarray(tokens)
    drawn = task.render_grid(np.where(tokens == IGNORE, task.spec.pad_id, tokens), question)
    text = drawn.get("text") if isinstance(drawn, dict) else None
    if text is None:
        return None
    flat = np.asarray(text, dtype=object).reshape(-1)
    if len(flat) != len(tokens):
        return None
    return [str(t) if t else "\u00b7" for t in flat.tolist()]


def render_example(inputs: np.ndarray, frames: np.ndarray, labels: np.ndarray, grid_shape, *, width: int = 100,
                   text=None) -> list[str]:
    """Lines showing x, every frame and y*: side-by-side grids when `grid_shape` is set, else one
    row of tokens per frame. A `*` follows each cell that differs from the panel before it.
    `text(tokens)`: the task's strings for the cells (`cell_text`), else token ids."""
    panels = [("x", inputs, np.zeros_like(inputs, dtype=bool))]
    prev = inputs
    for s, frame in enumerate(frames, start=1):
        panels.append((f"step {s}", frame, frame != prev))
        prev = frame
    panels.append(("y*", labels, labels != prev))
    shown = [_shown(vals, text(vals) if text is not None else None) for _, vals, _ in panels]
    w = max(len(v) for cells in shown for v in cells)
    if grid_shape is None:
        label_w = max(len(p[0]) for p in panels)
        return [(f"{name.ljust(label_w)}  " + "".join(_cells(cells, ch, w))).rstrip() for (name, _, ch), cells in zip(panels, shown)]
    rows, cols = grid_shape
    blocks = []
    for (name, _, ch), strings in zip(panels, shown):
        cells = _cells(strings, ch, w)
        grid = ["".join(cells[r * cols:(r + 1) * cols]) for r in range(rows)]
        pw = max(len(name), len(grid[0]))
        blocks.append([name.ljust(pw)] + [g.ljust(pw) for g in grid])
    lines, line_blocks, used = [], [], 0
    for block in blocks + [None]:
        if block is None or (line_blocks and used + len(block[0]) + 3 > width):
            lines += ["   ".join(parts).rstrip() for parts in zip(*line_blocks)] + [""]
            line_blocks, used = [], 0
        if block is not None:
            line_blocks.append(block)
            used += len(block[0]) + 3
    return lines[:-1]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def show_examples(resolved, registry, *, data_dir: Path = Path("data"), examples=None, count: int = 3, split: str = "train",
                  width: int = 100) -> str:
    """`count` examples of `split`, chosen by `examples` (see `choice`; a number is a count, as
    `dis show --examples N` always took), with the target path the recipe's generator gives them
    (its random draws seeded with train.seed, as the run's targets report)."""
    from dis_core.wiring.build import build_components

    if isinstance(examples, int) or (isinstance(examples, str) and examples.strip().isdigit()):
        count, examples = int(examples), None
    _positive(count, "--count")
    chosen = choice(examples, "show")
    recipe = resolved.recipe
    comp = build_components(resolved, registry, data_dir)
    boundary = Boundary.of(comp, registry)
    task, spec, n_sup = comp.task, comp.task.spec, recipe.supervision.n_sup
    ds = task.dataset(split)
    idx = pick(ds, count, chosen, check=boundary.batch)
    batch = fetch(ds, idx, check=boundary.batch)
    frames = boundary.frames(comp.targets(batch, n_sup, torch.Generator().manual_seed(recipe.train.seed)), batch)
    distance = hamming_to_labels(frames, batch["labels"])  # (B, N)
    grid = spec.grid_shape
    drawn = cell_text(task, batch["inputs"][0].numpy(), None) is not None if len(idx) else False
    lines = [
        f"# {resolved.source}: {_count(len(idx), split + ' example')} {chosen.describe()}; the target path of "
        f"{boundary.frames.who} over n_sup = {n_sup} steps (its random draws seeded with train.seed)",
        f"# {'grids of ' + 'x'.join(map(str, grid)) if grid else 'rows of ' + str(spec.seq_len)}"
        f"{' cells as the task draws them (' + chr(0xB7) + ' empty)' if drawn else ' token ids'}; '*' marks a cell changed since the panel before it, '.' an unsupervised cell (IGNORE)",
    ]
    for b in range(len(idx)):
        x, y, f = (t[b].cpu().numpy() for t in (batch["inputs"], batch["labels"], frames))
        differ = int(((x != y) & (y != IGNORE)).sum())
        d = distance[b].tolist()
        monotone = "monotone" if all(b2 <= a for a, b2 in zip(d, d[1:])) else "NOT monotone"
        lines += ["", f"example_id {int(batch['example_ids'][b])} (puzzle_id {int(batch['puzzle_ids'][b])}): "
                      f"{_count(differ, 'cell')} of x differ from y*; distance to y* by step {' '.join(map(str, d))} ({monotone})"]
        text = (lambda tokens, x=x: cell_text(task, tokens, x)) if drawn else None
        lines += render_example(x, f, y, grid, width=width, text=text)
    return "\n".join(lines)
