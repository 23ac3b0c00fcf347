"""Trajectory pictures (the DIS paper's Figure 7): how a trained model's answer to an example
develops over the supervision steps. `dis eval --trajectories N` and `train.eval_trajectories = N`
write one PNG per example and an `index.html` showing them all.

A picture reads left to right: the question; the answer after each supervision step, the cells
that step changed outlined (consecutive steps that leave the answer unchanged share one panel,
titled "steps 3-6"); the model's answer, titled with the task's verdict; the reference answer,
dashed where the model's answer differs from it. When the run's target generator gives each step
its own target (DIS), a second row shows under each step its target, dashed where that step's
answer differs from it. A legend names the outlines and, quoting the task's `render_grid`
docstring, its colours (the builtin tasks draw rule-breaking cells red: attacking queens,
repeated Sudoku digits).

The examples are chosen by `--examples` (`dis_core.outputs.selection.Choice`): by default `random`, seed
0, so every evaluation of a run, and every run of a task, shows the same examples and pictures
compare across steps and runs; `failures` needs the model's answers and is picked here. The
verdict is the task's own (`dis_core.outputs.selection.verdicts`: its validity evaluator, else exact match).

Each task may draw its own grids through an optional method

    render_grid(tokens, question) -> (R, C, 3) uint8 RGB   or   {"rgb": ..., "text": ..., ...}

`tokens` and `question` are (L,) int arrays (question: the example's input, for context such as
Sudoku givens; it may be None). An RGB array gives one colour per cell; a dict may add `text`
((R, C) strings drawn in the cells), `text_rgb` ((R, C, 3) uint8 text colours) and `boxes`
((rows, cols) of blocks outlined with thicker lines, e.g. Sudoku boxes). A task without the
method gets a token grid: one colour per token id, the ids written in the cells of small grids.
"""

from __future__ import annotations

import html
import inspect
import math
import textwrap
from pathlib import Path

import attrs
import numpy as np
import structlog
import torch

from dis_core.step.data import fetch
from dis_core.step.diagnostics import sample_indices
from dis_core.contract.interfaces import IGNORE, RenderableTask
from dis_core.outputs.selection import POOL, Choice, Verdict, pick, verdicts
from dis_core.step.supervision import Rollout

log = structlog.get_logger()

CHANGED = "#e6007e"  # outline of a cell the step changed
DIFFERS = "#1f1f1f"  # dashed outline (reference, target) of a cell where the model's answer differs
GOOD, BAD = "#1a7f37", "#c62828"  # the verdict's colour in titles
CHUNK = 64  # examples per rollout while looking for failures


# ------------------------------------------------------------------ running


def _cpu(batch: dict, result: Rollout) -> tuple[dict, Rollout]:
    return {k: v.cpu() for k, v in batch.items()}, Rollout(preds=result.preds.cpu(), q_halt=result.q_halt.cpu(), steps=result.steps.cpu())


def _rows(parts: list[tuple[dict, Rollout, np.ndarray]]) -> tuple[dict, Rollout]:
    """The rows `keep` of each (batch, rollout, keep), concatenated."""
    batch = {k: torch.cat([b[k][keep] for b, _, keep in parts]) for k in parts[0][0]}
    fields = {f: torch.cat([getattr(r, f)[keep] for _, r, keep in parts]) for f in ("preds", "q_halt", "steps")}
    return batch, Rollout(**fields)


@torch.inference_mode()
def run_examples(solver, dataset, n: int, *, examples: "str | Choice | None" = None):
    """(batch, Rollout), on the CPU, for up to `n` examples of `dataset` chosen by `examples`
    (default `random`), run by `solver` (a `dis_core.step.solver.Solver`); its evaluators give the
    verdicts `failures` picks by."""
    choice = Choice.parse(examples)

    def run(idx: np.ndarray) -> tuple[dict, Rollout]:
        batch = fetch(dataset, idx, solver.device)
        return _cpu(batch, solver.rollout(batch))

    if choice.how != "failures":
        return run(pick(dataset, n, choice))
    # Keep the rows as they ran in the search: a second run in another batch could round differently.
    pool, parts, found = sample_indices(len(dataset), POOL, choice.seed), [], 0
    for lo in range(0, len(pool), CHUNK):
        batch, result = run(pool[lo: lo + CHUNK])
        failed = np.array([v is not None and not v.ok for v in verdicts(batch, result, solver.evaluators, solver.task)], dtype=bool)
        keep = np.flatnonzero(failed)[: max(0, int(n) - found)]
        parts.append((batch, result, torch.from_numpy(keep)))
        found += len(keep)
        if found >= n:
            break
    return _rows(parts)


def target_frames(targets, batch: dict, n_sup: int, seed: int) -> torch.Tensor | None:
    """(B, n_sup, L) per-step targets the generator gives `batch` (its draws seeded as training
    seeds them); None when they are y* at every step (TRM's `final`) or it cannot make them."""
    if targets is None or not len(batch["inputs"]):
        return None
    try:
        frames = torch.as_tensor(targets(batch, n_sup, torch.Generator().manual_seed(seed))).cpu().long()
    except Exception as exc:  # e.g. plans only for training examples: the pictures come without targets
        log.warning("trajectory pictures without per-step targets: the target generator failed on these examples",
                    error=f"{type(exc).__name__}: {exc}")
        return None
    if frames.shape != (len(batch["inputs"]), n_sup, batch["inputs"].shape[1]) or bool((frames == batch["labels"][:, None]).all()):
        return None
    return frames


def pictures(solver, dataset, n: int, out_dir: Path, *, examples=None, title: str = "") -> list[Path]:
    """Choose, run, judge and draw: the PNGs (and index.html) of up to `n` examples of `dataset`
    as `solver` answers them, with the per-step targets its generator gives them (drawn as
    training seeds them, `train.seed`)."""
    choice = Choice.parse(examples)
    batch, result = run_examples(solver, dataset, n, examples=choice)
    frames = target_frames(solver.targets, batch, solver.rule.n_sup, solver.recipe.train.seed)
    return draw(solver.task, batch, result, out_dir, title=title, evaluators=solver.evaluators, targets=frames, examples=choice)


def for_model(model, n: int, out_dir: Path, *, examples=None, dataset=None, title: str = "") -> list[Path]:
    """`dis eval --trajectories N [--examples ...]`: pictures of a loaded `dis_core.load` model."""
    return pictures(model.solver, dataset if dataset is not None else model.task.dataset("test"), n, Path(out_dir),
                    examples=examples, title=title or f"{model.run_dir.name} · {model.checkpoint.name} · {model.weights} weights")


def at_evaluation(solver, dataset, n: int, run, step: int) -> list[Path]:
    """`train.eval_trajectories = N`: pictures of N examples of `dataset` (the test split; the
    default choice, `random`, so each evaluation shows the same ones) into
    RUN_DIR/eval/step_<step>/trajectories/, handed to the run's loggers. `run`: the RunDir.
    Called on rank 0 by the trainer's evaluation (the EMA weights in place)."""
    out = run.path / "eval" / f"step_{step}" / "trajectories"
    paths = pictures(solver, dataset, n, out, title=f"{run.path.name} · step {step}")
    if run.loggers:
        run.loggers.images(step, paths)
    return paths


# ------------------------------------------------------------------ grids


def grid_shape(spec) -> tuple[int, int]:
    if spec.grid_shape is not None and spec.grid_shape[0] * spec.grid_shape[1] == spec.seq_len:
        return tuple(spec.grid_shape)
    cols = math.ceil(math.sqrt(spec.seq_len))
    return math.ceil(spec.seq_len / cols), cols


def token_grid(tokens: np.ndarray, spec) -> dict:
    """The fallback drawing: one colour per token id, ids written in grids of up to 20x20."""
    import matplotlib

    rows, cols = grid_shape(spec)
    padded = np.full(rows * cols, -1, dtype=np.int64)
    padded[: len(tokens)] = tokens
    cmap = matplotlib.colormaps["tab20"]
    palette = (np.array([cmap(i % 20)[:3] for i in range(max(spec.vocab_size, 1))]) * 255).astype(np.uint8)
    rgb = np.where(padded[:, None] >= 0, palette[padded.clip(0, len(palette) - 1)], 255).reshape(rows, cols, 3)
    out = {"rgb": rgb.astype(np.uint8)}
    if rows * cols <= 400:
        out["text"] = np.array([str(t) if t >= 0 else "" for t in padded], dtype=object).reshape(rows, cols)
    return out


def render(task, tokens: np.ndarray, question: np.ndarray | None) -> dict:
    """The task's drawing of `tokens` as a dict with at least `rgb` (R, C, 3) uint8."""
    drawn = task.render_grid(tokens, question) if isinstance(task, RenderableTask) else token_grid(tokens, task.spec)
    if not isinstance(drawn, dict):
        drawn = {"rgb": drawn}
    rgb = np.asarray(drawn["rgb"])
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"render_grid returned an array of shape {rgb.shape}, not (rows, cols, 3)")
    return {**drawn, "rgb": rgb.astype(np.uint8)}


def colour_note(task) -> str:
    """What the cell colours mean: the first paragraph of the task's render_grid docstring."""
    if not isinstance(task, RenderableTask):
        return "cells coloured by token id (ids written in small grids)"
    doc = (inspect.getdoc(task.render_grid) or "").split("\n\n")[0]
    return " ".join(doc.split())


def _trim(panels: list[np.ndarray], pad_id: int) -> tuple[int, int]:
    """Rows and columns to show: everything up to the last one that is not padding in some panel
    (ARC grids sit top-left on a 30x30 canvas)."""
    grids = np.stack(panels) != pad_id  # (P, R, C)
    used_rows, used_cols = grids.any((0, 2)), grids.any((0, 1))
    r = int(np.flatnonzero(used_rows)[-1]) + 1 if used_rows.any() else grids.shape[1]
    c = int(np.flatnonzero(used_cols)[-1]) + 1 if used_cols.any() else grids.shape[2]
    return r, c


# ------------------------------------------------------------------ one picture


@attrs.frozen(eq=False)
class Panel:
    title: str
    tokens: np.ndarray  # (L,) what the panel draws
    outline: np.ndarray | None = None  # (L,) bool cells outlined
    dashed: bool = False  # outline style: dashed (the answer differs here) or solid (the step changed it)
    colour: str = "black"  # of the title


def columns(inputs: np.ndarray, labels: np.ndarray | None, preds: np.ndarray, steps: int, *, pad_id: int = 0,
            verdict: Verdict | None = None, targets: np.ndarray | None = None) -> list[tuple[Panel, Panel | None]]:
    """The panels of one picture as (top, bottom) columns: the question; one column per run of
    steps with the same answer (bottom: the target of the run's last step, when `targets`
    (n_sup, L) are given); the model's answer; the reference (when `labels` supervise a cell)."""
    frames = preds[:steps]
    out: list[tuple[Panel, Panel | None]] = [(Panel("question", inputs), None)]
    previous, s = inputs, 0
    while s < len(frames):
        e = s
        while e + 1 < len(frames) and np.array_equal(frames[e + 1], frames[s]):
            e += 1
        frame, changed = frames[s], frames[s] != previous
        name = f"step {s + 1}" if s == e else f"steps {s + 1}-{e + 1}"
        bottom = None
        if targets is not None and e < len(targets):
            supervised = targets[e] != IGNORE
            bottom = Panel(f"target, step {e + 1}", np.where(supervised, targets[e], pad_id), (frame != targets[e]) & supervised, True)
        out.append((Panel(f"{name}: {int(changed.sum())} changed", frame, changed), bottom))
        previous, s = frame, e + 1
    answer = frames[-1]
    title = "model's answer" + (f": {verdict.word}" if verdict is not None else "")
    out.append((Panel(title, answer, colour="black" if verdict is None else GOOD if verdict.ok else BAD), None))
    if labels is not None and (labels != IGNORE).any():
        supervised = labels != IGNORE
        differ = (answer != labels) & supervised
        n = int(differ.sum())
        out.append((Panel(f"reference: {n} cell{'s' * (n != 1)} differ{'s' * (n == 1)}" if n else "reference: the same",
                          np.where(supervised, labels, pad_id), differ, True), None))
    return out


def _draw_panel(ax, drawn: dict, keep: tuple[int, int], cell_pt: float, panel: Panel, outline=None) -> None:
    """One grid; `cell_pt` is a cell's side in points (sizes the text and the outlines)."""
    from matplotlib.patches import Rectangle

    r, c = keep
    ax.set_axis_on()
    ax.imshow(drawn["rgb"][:r, :c], interpolation="nearest", extent=(0, c, r, 0))
    ax.set_xlim(0, c)
    ax.set_ylim(r, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(panel.title, fontsize=11, color=panel.colour, fontweight="bold" if panel.colour != "black" else "normal")
    if max(r, c) <= 40:
        for i in range(1, r):
            ax.axhline(i, color="#9a9a9a", lw=0.4)
        for j in range(1, c):
            ax.axvline(j, color="#9a9a9a", lw=0.4)
    boxes = drawn.get("boxes")
    if boxes:
        for i in range(0, r + 1, boxes[0]):
            ax.axhline(i, color="black", lw=1.6)
        for j in range(0, c + 1, boxes[1]):
            ax.axvline(j, color="black", lw=1.6)
    text = drawn.get("text")
    if text is not None and cell_pt >= 5:
        colours = drawn.get("text_rgb")
        for i in range(r):
            for j in range(c):
                s = text[i][j]
                if s:
                    col = tuple(np.asarray(colours[i][j]) / 255) if colours is not None else "black"
                    size = cell_pt * (0.75 if len(s) == 1 else 0.55)
                    ax.text(j + 0.5, i + 0.52, s, ha="center", va="center", fontsize=size, color=col, fontweight="bold")
    if outline is not None:
        # A white stroke under the coloured one, so the outline shows on every cell colour.
        # Small cells get a thin outline on their border, so their colour stays visible.
        lw = max(0.6, min(3.0, cell_pt / 9))
        inset = 0.1 if cell_pt >= 14 else 0.0
        colour, style = (DIFFERS, (0, (2, 1.2))) if panel.dashed else (CHANGED, "-")
        for i, j in zip(*np.nonzero(outline[:r, :c])):
            for col, width, ls in (("white", lw * 1.9, "-"), (colour, lw, style)):
                ax.add_patch(Rectangle((j + inset, i + inset), 1 - 2 * inset, 1 - 2 * inset, fill=False, ec=col, lw=width, ls=ls))


def figure(task, cols: list[tuple[Panel, Panel | None]], question: np.ndarray, head: str):
    """The matplotlib Figure of one picture: columns wrap at 8 a line; with targets, each line
    has a row of answers and a row of targets under them; the legend at the bottom."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    spec = task.spec
    shape = grid_shape(spec)

    def cells(a: np.ndarray) -> np.ndarray:
        padded = np.full(shape[0] * shape[1], spec.pad_id, dtype=np.int64)
        padded[: len(a)] = a
        return padded.reshape(shape)

    panels = [p for col in cols for p in col if p is not None]
    keep = _trim([cells(p.tokens) for p in panels], spec.pad_id)
    lines = math.ceil(len(cols) / 8)
    per_line = math.ceil(len(cols) / lines)  # rows filled evenly
    two = any(bottom is not None for _, bottom in cols)
    rows = lines * (2 if two else 1)
    aspect = keep[0] / keep[1]
    side = 2.6 if max(keep) <= 12 else 3.2  # inches per panel; larger grids get larger panels
    width = side * per_line
    note = textwrap.fill("cell colours: " + colour_note(task), width=max(60, int(width * 14)))
    foot = 0.45 + 0.17 * note.count("\n")  # inches for the legend and the colour note
    height = rows * (side * aspect + 0.55) + 0.4 + foot
    fig, axes = plt.subplots(rows, per_line, figsize=(width, height), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    cell_pt = 0.85 * 72 * side / keep[1]  # a cell's side in points, about (the titles take some room)
    for k, (top, bottom) in enumerate(cols):
        line, c = divmod(k, per_line)
        row = line * (2 if two else 1)
        for r, panel in ((row, top), (row + 1, bottom)):
            if panel is not None:
                outline = cells(panel.outline).astype(bool) if panel.outline is not None else None
                _draw_panel(axes[r, c], render(task, panel.tokens, question), keep, cell_pt, panel, outline)
    handles = [Patch(facecolor="none", edgecolor=CHANGED, lw=2, label="a cell this step changed")]
    if any(p.dashed for p in panels):
        handles.append(Patch(facecolor="none", edgecolor=DIFFERS, lw=1.5, ls=(0, (2, 1.2)),
                             label="the model's answer differs here (reference: the final answer; target: that step's answer)"))
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, (foot - 0.3) / height), ncol=len(handles),
               fontsize=9, frameon=False, handlelength=1.2)
    fig.text(0.5, 0.06 / height, note, ha="center", va="bottom", fontsize=9, color="#444444")
    fig.suptitle(head, fontsize=12)
    fig.tight_layout(rect=(0, foot / height, 1, 1 - 0.35 / height))
    return fig


def draw_example(task, inputs: np.ndarray, labels: np.ndarray | None, preds: np.ndarray, steps: int, path: Path,
                 title: str = "", *, verdict: Verdict | None = None, targets: np.ndarray | None = None) -> dict:
    """One PNG (see the module docstring); returns what index.html says about it."""
    import matplotlib.pyplot as plt

    cols = columns(inputs, labels, preds, steps, pad_id=task.spec.pad_id, verdict=verdict, targets=targets)
    head = " · ".join(x for x in (title, f"{steps} step{'s' * (steps != 1)}", str(verdict) if verdict else "") if x)
    fig = figure(task, cols, inputs, head)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return {"file": path.name, "steps": steps, "verdict": str(verdict) if verdict else "", "title": title}


def draw(task, batch: dict, result: Rollout, out_dir: Path, *, title: str = "", evaluators=None,
         targets: torch.Tensor | None = None, examples=None) -> list[Path]:
    """`example_<id>.png` for each example of `batch` (CPU tensors) and `index.html`.
    `evaluators` give the verdicts (else exact match), `targets` (B, n_sup, L) the per-step
    targets, `examples` the choice that picked them (said on the index page)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, labels = batch["inputs"].numpy(), batch["labels"].numpy()
    ids = batch["example_ids"].numpy() if "example_ids" in batch else np.arange(len(inputs))
    preds, steps = result.preds.numpy(), result.steps.numpy()
    judged = verdicts(batch, result, evaluators, task) if len(inputs) else []
    paths, entries = [], []
    for i in range(len(inputs)):
        path = out_dir / f"example_{int(ids[i]):06d}.png"
        entries.append(draw_example(task, inputs[i], labels[i], preds[i], max(1, int(steps[i])), path, f"example {int(ids[i])}",
                                    verdict=judged[i], targets=targets[i].numpy() if targets is not None else None))
        paths.append(path)
    write_index(out_dir, entries, title, Choice.parse(examples))
    return paths


def write_index(out_dir: Path, entries: list[dict], title: str, choice: Choice | None = None) -> Path:
    rows = []
    for e in entries:
        caption = html.escape(" · ".join(x for x in (e["title"], f"{e['steps']} step(s)", e["verdict"]) if x))
        rows.append(f'<figure><a href="{html.escape(e["file"])}"><img src="{html.escape(e["file"])}" alt="{caption}"></a>'
                    f"<figcaption>{caption}</figcaption></figure>")
    chosen = f"Examples {choice.describe()}." if choice is not None else ""
    if choice is not None and not entries:
        chosen += " None was found." if choice.how == "failures" else " None."
    page = (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>trajectories</title>\n"
        "<style>body{font-family:sans-serif;margin:1em} img{max-width:100%;border:1px solid #ccc} "
        "figure{margin:0 0 2em 0}</style></head>\n<body>\n"
        f"<h1>Trajectories</h1>\n<p>{html.escape(title)}</p>\n<p>{html.escape(chosen)}</p>\n<p>Each picture: the question, "
        "the answer after each supervision step (cells the step changed outlined; steps that change nothing share a "
        "panel), the model's answer with the task's verdict, and the reference (dashed where the model's answer "
        "differs). With per-step targets, each step's target is drawn under it.</p>\n" + "\n".join(rows) + "\n</body></html>\n"
    )
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
