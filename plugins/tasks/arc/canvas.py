"""Smaller canvases for small-grid ARC recipes, and the subsets an `arc` task loads.

The reference renders every grid on a 30x30 canvas (900 tokens plus the puzzle prefix), and
attention over ~916 positions is what makes ARC slow on a CPU. Many ARC tasks never use more than
a corner of it: 178 of ARC-AGI-1's 400 training tasks (77 of its 400 evaluation tasks, 39 of
ConceptARC's 160) have no grid larger than 10x10. `canvas = S` renders on an S x S canvas (S*S
tokens; at S 10 that is 100, so attention costs ~80x less per call and the rest ~9x less) and
keeps only the tasks whose every grid fits. A task with a larger grid is dropped whole, never
cropped: a cropped grid is another task, and a cropped true output could not be scored. Each
subset logs how many tasks it kept and dropped. The default, 30, is the reference: every grid
the sources accept fits, and nothing is filtered or rendered differently.

`valid_subset` names a subset held out like the test subset (its demonstrations trained on, its
test pairs scored), served as the `valid` split, so that `dis study` can select on it and read
the real test subset only once.
"""

from __future__ import annotations

import structlog

from dis_core.contract.errors import UserError

from .encoding import SIDE
from .sources import Puzzle, check_disjoint, load_subset

log = structlog.get_logger()

# A grid needs its cells and, where it does not fill the canvas, the EOS row and column after
# it; below 2x2 no ARC task fits (every one has a grid of at least 2 cells on a side somewhere).
MIN_CANVAS = 2


def check_canvas(canvas: int) -> None:
    if not isinstance(canvas, int) or not MIN_CANVAS <= canvas <= SIDE:
        raise UserError(f"task.config.canvas must be an integer from {MIN_CANVAS} to {SIDE} (the reference's "
                        f"30x30 canvas), got {canvas!r}")


def largest_side(puzzle: Puzzle) -> int:
    """The largest height or width of any grid of the task (the canvas side it needs: a dihedral
    transform can swap height and width, so both must fit)."""
    return max(max(g.shape) for g in puzzle.grids())


def fit_subset(puzzles: list[Puzzle], canvas: int, subset: str, key: str, limit: int | None) -> list[Puzzle]:
    """The tasks of `subset` whose every grid fits the canvas, then the first `limit` of them.

    The limit applies after the fit, so that `max_*_puzzles` counts tasks the recipe can use. A
    subset none of whose tasks fits is an error naming the key that listed it: the recipe asked
    for those tasks explicitly and would silently train or score nothing of them."""
    if canvas == SIDE:  # the reference: the sources refuse grids over 30, so every task fits
        return puzzles[:limit] if limit is not None else puzzles
    sides = [largest_side(p) for p in puzzles]
    kept = [p for p, s in zip(puzzles, sides) if s <= canvas]
    dropped = [p.task_id for p, s in zip(puzzles, sides) if s > canvas]
    if puzzles and not kept:
        raise UserError(f"task.config.canvas = {canvas} is too small for every task of {subset!r} (named by "
                        f"task.config.{key}): its smallest task needs a {min(sides)}x{min(sides)} canvas. Raise "
                        f"task.config.canvas to at least {min(sides)} or name another subset")
    if dropped:
        log.info("arc tasks dropped: a grid does not fit the canvas", subset=subset, canvas=canvas, kept=len(kept),
                 dropped=len(dropped), first_dropped=", ".join(dropped[:3]))
    return kept[:limit] if limit is not None else kept


def load_puzzles(config) -> tuple[dict[str, list[Puzzle]], list[Puzzle], list[Puzzle]]:
    """(train subsets by name, validation tasks, test tasks) of an `ArcConfig` built from sources:
    each subset loaded, fitted to the canvas, and checked disjoint from the others."""
    canvas = getattr(config, "canvas", SIDE)
    check_canvas(canvas)
    limit = config.max_train_puzzles_per_subset
    train = {s: fit_subset(load_subset(s), canvas, s, "train_subsets", limit) for s in dict.fromkeys(config.train_subsets)}
    test = fit_subset(load_subset(config.test_subset), canvas, config.test_subset, "test_subset", config.max_test_puzzles)
    valid_subset = getattr(config, "valid_subset", None)
    valid = []
    if valid_subset is not None:
        if valid_subset == config.test_subset or valid_subset in train:
            raise UserError(f"task.config.valid_subset {valid_subset!r} is also the test subset or a train subset; "
                            f"validation tasks must be held out of both")
        valid = fit_subset(load_subset(valid_subset), canvas, valid_subset, "valid_subset", config.max_test_puzzles)
    # The validation tasks' demonstrations are trained on like the test subset's, so they are
    # checked against the test subset (no leak) and the train subsets (each task once) as one more
    # train-side subset.
    check_disjoint({**train, **({valid_subset: valid} if valid_subset is not None else {})}, config.test_subset, test)
    if canvas != SIDE:
        log.info("arc canvas", canvas=canvas, seq_len=canvas * canvas, train_tasks=sum(len(v) for v in train.values()),
                 valid_tasks=len(valid), test_tasks=len(test))
    return train, valid, test
