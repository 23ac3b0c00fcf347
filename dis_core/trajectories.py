"""Trajectory pictures (the DIS paper's Figure 7): an example's question, the answer after each
supervision step with the cells that step changed outlined, and the true answer.

`run_examples` runs the first N examples of a split through `supervision.rollout` (the code
evaluation uses); `draw` writes one PNG per example and an `index.html` showing them all.
`dis eval --trajectories N` and `train.eval_trajectories = N` call both.

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
import math
from pathlib import Path

import numpy as np
import torch

from dis_core.data import fetch
from dis_core.interfaces import IGNORE, RenderableTask
from dis_core.supervision import Rollout, rollout

CHANGED = "#e6007e"  # outline of a cell the step changed
WRONG = "#1f1f1f"  # outline (answer panel) of a cell the final prediction gets wrong


@torch.inference_mode()
def run_examples(backbone, puzzle_emb, dataset, rule, halting, n: int, *, device, bf16: bool = False):
    """(batch, Rollout) on the CPU for the first `n` examples of `dataset`."""
    n = min(int(n), len(dataset))
    batch = fetch(dataset, np.arange(n, dtype=np.int64), device)
    emb = puzzle_emb(batch["puzzle_ids"]) if puzzle_emb is not None else None
    out = rollout(backbone, batch, rule, halting, puzzle_emb=emb, bf16=bf16)
    cpu = Rollout(preds=out.preds.cpu(), q_halt=out.q_halt.cpu(), steps=out.steps.cpu())
    return {k: v.cpu() for k, v in batch.items()}, cpu


def at_evaluation(trainer) -> list[Path]:
    """`train.eval_trajectories = N`: pictures of the first N test examples into
    RUN_DIR/eval/step_<step>/trajectories/, handed to the run's loggers. Rank 0 only; called by
    the trainer's evaluation (within it the EMA weights are in place)."""
    n = trainer.train_cfg.eval_trajectories
    if not n or trainer.rank != 0:
        return []
    batch, result = run_examples(trainer.engine.module.backbone, trainer.puzzle_emb, trainer.test_set, trainer.rule,
                                 trainer.comp.halting, n, device=trainer.device, bf16=trainer.precision == "bf16")
    out = trainer.run.path / "eval" / f"step_{trainer.step}" / "trajectories"
    paths = draw(trainer.comp.task, batch, result, out, title=f"{trainer.run.path.name} · step {trainer.step}")
    if trainer.run.loggers:
        trainer.run.loggers.images(trainer.step, paths)
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


def _render(task, tokens: np.ndarray, question: np.ndarray | None) -> dict:
    drawn = task.render_grid(tokens, question) if isinstance(task, RenderableTask) else token_grid(tokens, task.spec)
    if not isinstance(drawn, dict):
        drawn = {"rgb": drawn}
    rgb = np.asarray(drawn["rgb"])
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"render_grid returned an array of shape {rgb.shape}, not (rows, cols, 3)")
    return {**drawn, "rgb": rgb.astype(np.uint8)}


def _trim(panels: list[np.ndarray], pad_id: int) -> tuple[int, int]:
    """Rows and columns to show: everything up to the last one that is not padding in some panel
    (ARC grids sit top-left on a 30x30 canvas)."""
    grids = np.stack(panels) != pad_id  # (P, R, C)
    used_rows, used_cols = grids.any((0, 2)), grids.any((0, 1))
    r = int(np.flatnonzero(used_rows)[-1]) + 1 if used_rows.any() else grids.shape[1]
    c = int(np.flatnonzero(used_cols)[-1]) + 1 if used_cols.any() else grids.shape[2]
    return r, c


def _draw_panel(ax, drawn: dict, keep: tuple[int, int], cell_pt: float, title: str, outline=None, outline_colour=CHANGED,
                dashed=False) -> None:
    """One grid; `cell_pt` is a cell's side in points (sizes the text and the outlines)."""
    from matplotlib.patches import Rectangle

    r, c = keep
    rgb = drawn["rgb"][:r, :c]
    ax.imshow(rgb, interpolation="nearest", extent=(0, c, r, 0))
    ax.set_xlim(0, c)
    ax.set_ylim(r, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=11)
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
                    ax.text(j + 0.5, i + 0.52, s, ha="center", va="center", fontsize=size, color=col,
                            fontweight="bold")
    if outline is not None:
        # A white stroke under the coloured one, so the outline shows on every cell colour.
        # Small cells get a thin outline on their border, so their colour stays visible.
        lw = max(0.6, min(3.0, cell_pt / 9))
        inset = 0.1 if cell_pt >= 14 else 0.0
        for i, j in zip(*np.nonzero(outline[:r, :c])):
            for colour, width, style in (("white", lw * 1.9, "-"), (outline_colour, lw, (0, (2, 1.2)) if dashed else "-")):
                ax.add_patch(Rectangle((j + inset, i + inset), 1 - 2 * inset, 1 - 2 * inset, fill=False, ec=colour, lw=width, ls=style))


def draw_example(task, inputs: np.ndarray, labels: np.ndarray | None, preds: np.ndarray, steps: int, path: Path,
                 title: str = "") -> dict:
    """One PNG: question, the answer after each of the `steps` steps (changed cells outlined),
    the true answer (wrong final cells outlined, dashed) when `labels` supervise any cell.
    Returns what index.html says about it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    spec = task.spec
    shape = grid_shape(spec)
    frames = [preds[s] for s in range(steps)]
    has_answer = labels is not None and (labels != IGNORE).any()
    answer = np.where(labels == IGNORE, spec.pad_id, labels) if has_answer else None
    panels = [inputs, *frames] + ([answer] if has_answer else [])

    def cells(a: np.ndarray) -> np.ndarray:
        padded = np.full(shape[0] * shape[1], spec.pad_id, dtype=np.int64)
        padded[: len(a)] = a
        return padded.reshape(shape)

    keep = _trim([cells(p) for p in panels], spec.pad_id)

    final = frames[-1]
    supervised = labels != IGNORE if has_answer else None
    wrong = int(((final != labels) & supervised).sum()) if has_answer else None
    n = len(panels)
    nrows = math.ceil(n / 8)  # at most 8 panels a row, rows filled evenly
    ncols = math.ceil(n / nrows)
    aspect = keep[0] / keep[1]
    side = 2.6 if max(keep) <= 12 else 3.2  # inches per panel; larger grids get larger panels
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, nrows * (side * aspect + 0.45) + 0.8), dpi=100, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    cell_pt = 0.85 * 72 * side / keep[1]  # a cell's side in points, about (the titles take some room)
    _draw_panel(axes.flat[0], _render(task, inputs, inputs), keep, cell_pt, "question")
    previous = inputs
    for s, frame in enumerate(frames, 1):
        changed = cells(frame) != cells(previous)
        _draw_panel(axes.flat[s], _render(task, frame, inputs), keep, cell_pt, f"step {s}: {int(changed.sum())} changed", changed)
        previous = frame
    if has_answer:
        miss = cells(final) != cells(answer)
        miss &= cells(np.where(supervised, 1, 0)).astype(bool)
        _draw_panel(axes.flat[n - 1], _render(task, answer, inputs), keep, cell_pt, "answer" if not wrong else f"answer ({wrong} wrong)",
                    miss, WRONG, dashed=True)
    verdict = "" if not has_answer else ("final answer correct" if not wrong else f"final answer: {wrong} cell(s) wrong")
    head = " · ".join(x for x in (title, f"{steps} step(s)", verdict) if x)
    fig.suptitle(head, fontsize=12)
    fig.text(0.5, 0.005, "solid outline: cell changed by that step" + (" · dashed outline: final answer wrong there" if has_answer else ""),
             ha="center", va="bottom", fontsize=9, color="#444444")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return {"file": path.name, "steps": steps, "wrong": wrong, "title": title}


def draw(task, batch: dict, result: Rollout, out_dir: Path, *, title: str = "") -> list[Path]:
    """`example_<i>.png` for each example of `batch` (CPU tensors) and `index.html`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, labels = batch["inputs"].numpy(), batch["labels"].numpy()
    ids = batch["example_ids"].numpy() if "example_ids" in batch else np.arange(len(inputs))
    preds, steps = result.preds.numpy(), result.steps.numpy()
    paths, entries = [], []
    for i in range(len(inputs)):
        path = out_dir / f"example_{int(ids[i]):06d}.png"
        entry = draw_example(task, inputs[i], labels[i], preds[i], max(1, int(steps[i])), path, f"example {int(ids[i])}")
        paths.append(path)
        entries.append(entry)
    write_index(out_dir, entries, title)
    return paths


def write_index(out_dir: Path, entries: list[dict], title: str) -> Path:
    rows = []
    for e in entries:
        verdict = "" if e["wrong"] is None else ("correct" if e["wrong"] == 0 else f"{e['wrong']} cell(s) wrong")
        caption = html.escape(" · ".join(x for x in (e["title"], f"{e['steps']} step(s)", verdict) if x))
        rows.append(f'<figure><a href="{html.escape(e["file"])}"><img src="{html.escape(e["file"])}" alt="{caption}"></a>'
                    f"<figcaption>{caption}</figcaption></figure>")
    page = (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>trajectories</title>\n"
        "<style>body{font-family:sans-serif;margin:1em} img{max-width:100%;border:1px solid #ccc} "
        "figure{margin:0 0 2em 0}</style></head>\n<body>\n"
        f"<h1>Trajectories</h1>\n<p>{html.escape(title)}</p>\n<p>Each picture: the question, the answer after each "
        "supervision step (cells the step changed outlined), and the true answer (cells the final answer gets wrong "
        "outlined, dashed).</p>\n" + "\n".join(rows) + "\n</body></html>\n"
    )
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
