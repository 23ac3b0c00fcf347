"""`dis eval` and `dis predict`: use a trained model (dis_core/inference.py) from the command line.

Cheap to import (the `dis` parser imports it): torch and the model load only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def add_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a trained run or checkpoint on the test split (or another data source)")
    ev.add_argument("source", type=Path, metavar="RUN_DIR|CHECKPOINT",
                    help="a run directory (its newest checkpoint) or RUN_DIR/checkpoints/step_N")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the run's recipe, e.g. --set task.config.csv_test=extreme_test.csv (repeatable)")
    ev.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="where metrics.json and the evaluators' files go (default RUN_DIR/eval-<time>)")
    ev.add_argument("--trajectories", type=int, default=0, metavar="N",
                    help="also draw the first N test examples step by step (DIR/trajectories/*.png, index.html)")
    ev.add_argument("--limit", type=int, default=None, metavar="K", help="evaluate the first K test examples (default: the recipe's train.eval_limit)")
    ev.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: the run's evaluation batch)")
    ev.add_argument("--weights", choices=("auto", "ema", "trained"), default="auto",
                    help="auto: the EMA weights when the run kept them, else the trained ones")
    ev.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")
    ev.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)

    pr = sub.add_parser("predict", help="answer new puzzles with a trained model, step by step, as JSON")
    pr.add_argument("source", type=Path, metavar="CHECKPOINT", help="a run directory or RUN_DIR/checkpoints/step_N")
    pr.add_argument("inputs", metavar="INPUTS",
                    help="a JSON file holding a list of puzzles in the task's input format ('-' reads stdin)")
    pr.add_argument("--steps", type=int, default=None, help="supervision steps to run (default: all the model was trained for)")
    pr.add_argument("--w", type=float, default=1.0, dest="guidance",
                    help="guidance scale w (paper Eq. 5): answers from (1 - w) l_u + w l_c; 1 = the plain model")
    pr.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the JSON here instead of stdout")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key of the run's recipe")
    pr.add_argument("--batch-size", type=int, default=None, help="puzzles per batch (default: the run's evaluation batch)")
    pr.add_argument("--weights", choices=("auto", "ema", "trained"), default="auto")
    pr.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")


def _positive(value: int | None, flag: str) -> None:
    from dis_core.errors import UserError

    if value is not None and value <= 0:
        raise UserError(f"{flag} must be a positive number, got {value}")


def cmd_eval(args) -> int:
    from dis_core.inference import load
    from dis_core.metrics import is_per_step

    _positive(args.limit, "--limit")
    _positive(args.batch_size, "--batch-size")
    if args.trajectories < 0:
        _positive(args.trajectories, "--trajectories")
    model = load(args.source, set_overrides=args.overrides, data_dir=args.data_dir, weights=args.weights)
    out = args.out or model.run_dir / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        from dis_core.errors import UserError

        raise UserError(f"--out {out} is an existing file, not a directory")
    metrics = model.evaluate(limit=args.limit, out_dir=out, batch_size=args.batch_size, trajectories=args.trajectories)
    if int(os.environ.get("RANK", "0")) == 0:
        shown = {k: round(v, 4) for k, v in metrics.items() if not is_per_step(k)}
        print(json.dumps(shown, indent=2))
        print(f"{model!r}\nwritten to {out}" + (f" (trajectories: {out / 'trajectories' / 'index.html'})" if args.trajectories else ""),
              file=sys.stderr)
    return 0


def _read_inputs(spec: str):
    from dis_core.errors import DataError

    try:
        text = sys.stdin.read() if spec == "-" else Path(spec).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{spec}: no such file (INPUTS is a JSON file holding a list of puzzles, or '-' for stdin)") from None
    except IsADirectoryError:
        raise DataError(f"{spec}: is a directory, not a JSON file") from None
    except UnicodeDecodeError:
        raise DataError(f"{spec}: not UTF-8 text") from None
    try:
        puzzles = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{spec}: not valid JSON ({exc})") from None
    if not isinstance(puzzles, list):
        raise DataError(f"{spec}: expected a JSON array of puzzles, got a {type(puzzles).__name__}")
    return puzzles


def cmd_predict(args) -> int:
    from dis_core.inference import load

    _positive(args.batch_size, "--batch-size")
    _positive(args.steps, "--steps")
    puzzles = _read_inputs(args.inputs)
    model = load(args.source, set_overrides=args.overrides, data_dir=args.data_dir, weights=args.weights)
    answers = model.predict(puzzles, steps=args.steps, batch_size=args.batch_size, guidance=args.guidance)
    doc = {"checkpoint": str(model.checkpoint), "step": model.step, "weights": model.weights, "task": model.recipe.task.name,
           "steps": model.check_steps(args.steps), "w": args.guidance, "predictions": answers}
    text = _dumps(doc)
    if args.out is not None:
        from dis_core.rundir import atomic_write

        if args.out.parent != Path("."):
            args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, text)
        print(f"{len(answers)} answer(s) written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _dumps(doc: dict) -> str:
    """JSON with one prediction a line, so that boards stay readable."""
    head = json.dumps({k: v for k, v in doc.items() if k != "predictions"}, indent=1)[:-2]
    rows = ",\n".join("  " + json.dumps(p) for p in doc["predictions"])
    return f'{head},\n "predictions": [\n{rows}\n ]\n}}\n'


COMMANDS = {"eval": cmd_eval, "predict": cmd_predict}
