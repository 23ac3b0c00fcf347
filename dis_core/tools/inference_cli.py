"""`dis eval` and `dis predict`: use a trained model (dis_core/tools/inference.py) from the command line.

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
                    help="also draw N test examples step by step (DIR/trajectories/*.png, index.html)")
    ev.add_argument("--examples", default=None, metavar="CHOICE", help="with --trajectories: which test examples: random "
                    "(default, seed 0), random:SEED, failures, hardest, first or ids:3,17,42")
    ev.add_argument("--split", choices=("test", "valid"), default="test",
                    help="the task's split to evaluate: test (default) or valid, the validation split (dis study)")
    ev.add_argument("--limit", type=int, default=None, metavar="K", help="evaluate the first K test examples (default: the recipe's train.eval_limit)")
    ev.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: the run's evaluation batch)")
    ev.add_argument("--tasks", default=None, metavar="ID[,ID...]|@FILE|N",
                    help="evaluate these test tasks only (ARC): ids, a file of ids (one a line, or a JSON list), or N for the first N")
    ev.add_argument("--num-aug", type=int, default=None, metavar="K",
                    help="vote over the original and the first K augmentations of each test pair (ARC; default: all)")
    ev.add_argument("--resume", action="store_true",
                    help="continue an evaluation that was stopped: without --out, the newest RUN_DIR/eval-* holding partial results")
    ev.add_argument("--weights", choices=("auto", "ema", "trained"), default="auto",
                    help="auto: the EMA weights when the run kept them, else the trained ones")
    ev.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")
    ev.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)

    pr = sub.add_parser("predict", help="answer new puzzles with a trained model, step by step, as JSON (or JSON Lines)")
    pr.add_argument("source", type=Path, metavar="CHECKPOINT", help="a run directory or RUN_DIR/checkpoints/step_N")
    pr.add_argument("inputs", metavar="INPUTS",
                    help="a JSON file holding a list of puzzles in the task's input format ('-' reads stdin)")
    pr.add_argument("--steps", type=int, default=None, help="supervision steps to run (default: all the model was trained for)")
    pr.add_argument("--w", type=float, default=1.0, dest="guidance",
                    help="guidance scale w (paper Eq. 5): answers from (1 - w) l_u + w l_c; 1 = the plain model")
    pr.add_argument("--out", type=Path, default=None, metavar="FILE",
                    help="write the answers here instead of stdout, batch by batch: FILE.jsonl as JSON Lines, any other "
                         "name as one JSON object (valid after every batch)")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key of the run's recipe")
    pr.add_argument("--batch-size", type=int, default=None, help="puzzles per batch (default: the run's evaluation batch)")
    pr.add_argument("--weights", choices=("auto", "ema", "trained"), default="auto")
    pr.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")


def _positive(value: int | None, flag: str) -> None:
    from dis_core.contract.errors import UserError

    if value is not None and value <= 0:
        raise UserError(f"{flag} must be a positive number, got {value}")


def parse_tasks(spec: str | None):
    """--tasks: None, a count N (the first N test tasks), or a list of task ids (from
    `ID,ID,...` or `@FILE`: one id a line, or a JSON list of ids)."""
    from dis_core.contract.errors import UserError

    if spec is None:
        return None
    spec = spec.strip()
    if spec.isdigit():
        if int(spec) <= 0:
            raise UserError(f"--tasks {spec}: the number of tasks must be positive")
        return int(spec)
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--tasks {spec}: cannot read {path} ({type(exc).__name__})") from None
        if text.lstrip().startswith("["):
            try:
                ids = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"--tasks {spec}: {path} is not a valid JSON list ({exc})") from None
            if not all(isinstance(i, str) for i in ids):
                raise UserError(f"--tasks {spec}: {path} must list task ids as strings")
        else:
            ids = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    else:
        ids = [i.strip() for i in spec.split(",") if i.strip()]
    if not ids:
        raise UserError(f"--tasks {spec!r}: names no task")
    return list(dict.fromkeys(ids))


def _eval_out(args, run_dir: Path) -> Path:
    """--out, else for --resume the newest RUN_DIR/eval-* left unfinished (partial results, no
    metrics.json), else a new RUN_DIR/eval-<time>."""
    from dis_core.contract.errors import UserError

    if args.out is not None:
        if args.resume and not (args.out / "partial" / "manifest.json").is_file():
            raise UserError(f"--resume: {args.out} holds no partial results (no partial/manifest.json)")
        return args.out
    if args.resume:
        found = sorted(p for p in run_dir.glob("eval-*")
                       if (p / "partial" / "manifest.json").is_file() and not (p / "metrics.json").exists())
        if not found:
            raise UserError(f"--resume: no unfinished evaluation under {run_dir} (eval-*/partial/ without metrics.json); "
                            f"name one with --out")
        return found[-1]  # eval-<time> names sort by time
    return run_dir / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"


def _rank0_folder(out: Path) -> Path:
    """Rank 0's folder on every rank of a launch: each rank writes its own partial results
    there, and a default eval-<time> differs between processes started a second apart."""
    from dis_core.loop import engine as dist

    if dist.world_size() == 1:
        return out
    import torch.distributed

    box = [str(out)]
    torch.distributed.broadcast_object_list(box, src=0)
    return Path(box[0])


def cmd_eval(args) -> int:
    from dis_core.tools.inference import load
    from dis_core.contract.metrics import is_per_step

    _positive(args.limit, "--limit")
    _positive(args.batch_size, "--batch-size")
    if args.trajectories < 0:
        _positive(args.trajectories, "--trajectories")
    if args.num_aug is not None and args.num_aug < 0:
        from dis_core.contract.errors import UserError

        raise UserError(f"--num-aug {args.num_aug}: the number of augmentations must be 0 or more")
    tasks = parse_tasks(args.tasks)  # a bad --tasks stops here, before the model loads
    from dis_core.outputs import trajectories

    trajectories.Choice.parse(args.examples)  # a bad --examples stops here, before the model loads
    model = load(args.source, set_overrides=args.overrides, data_dir=args.data_dir, weights=args.weights)
    out = _eval_out(args, model.run_dir)
    if args.out is None:
        out = _rank0_folder(out)
    if out.exists() and not out.is_dir():
        from dis_core.contract.errors import UserError

        raise UserError(f"--out {out} is an existing file, not a directory")

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # Resumable whenever the evaluation writes somewhere: a rerun of the same command continues it.
    metrics = model.evaluate(model.task.dataset(args.split), limit=args.limit, out_dir=out, batch_size=args.batch_size,
                             tasks=tasks, num_aug=args.num_aug, resumable=True, report=report)
    if args.trajectories and int(os.environ.get("RANK", "0")) == 0:
        trajectories.for_model(model, args.trajectories, out / "trajectories", examples=args.examples)
    if int(os.environ.get("RANK", "0")) == 0:
        shown = {k: round(v, 4) for k, v in metrics.items() if not is_per_step(k)}
        print(json.dumps(shown, indent=2))
        print(f"{model!r}\nwritten to {out}" + (f" (trajectories: {out / 'trajectories' / 'index.html'})" if args.trajectories else ""),
              file=sys.stderr)
    return 0


def _read_inputs(spec: str):
    from dis_core.contract.errors import DataError

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


def _check_w(w: float) -> None:
    import math

    from dis_core.contract.errors import UserError

    if not math.isfinite(w):
        raise UserError(f"--w {w}: the guidance scale must be a finite number (1 = the plain model)")


def _check_out(out: Path | None) -> None:
    """Before the model loads: --out must name a file that can be created."""
    from dis_core.contract.errors import UserError

    if out is None:
        return
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; name the answers file, e.g. --out {out / 'answers.json'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a directory")


def cmd_predict(args) -> int:
    from dis_core.contract.errors import DataError
    from dis_core.tools.inference import load
    from dis_core.contract.logs import progress

    _positive(args.batch_size, "--batch-size")
    _positive(args.steps, "--steps")
    _check_w(args.guidance)
    _check_out(args.out)
    puzzles = _read_inputs(args.inputs)
    model = load(args.source, set_overrides=args.overrides, data_dir=args.data_dir, weights=args.weights)
    steps = model.check_steps(args.steps)
    where = "stdin" if args.inputs == "-" else args.inputs
    try:  # every puzzle is checked here, before anything is written
        batches = model.predict_batches(puzzles, steps, batch_size=args.batch_size, guidance=args.guidance)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    head = {"checkpoint": str(model.checkpoint), "step": model.step, "weights": model.weights,
            "task": model.recipe.task.name, "steps": steps, "w": args.guidance, "count": len(puzzles)}
    writer = AnswerWriter.open(args.out, head)
    done = inconsistent = 0
    bar = progress(len(puzzles), "predict", unit="puzzle")
    try:
        for rows in batches:
            writer.write(rows)
            done += len(rows)
            inconsistent += sum(r["givens_consistent"] is False for r in rows)
            bar.update(len(rows))
    except KeyboardInterrupt:
        bar.close()
        writer.abandon()
        print(f"interrupted: {done} of {len(puzzles)} answer(s) written" + (f" to {args.out}" if args.out else ""),
              file=sys.stderr)
        return 130
    except BaseException:
        bar.close()
        writer.abandon()
        raise
    bar.close()
    writer.close()
    if inconsistent:
        print(f"{inconsistent} puzzle(s) have givens that break the puzzle's rules (\"givens_consistent\": false); "
              f"no valid answer exists for them", file=sys.stderr)
    if args.out is not None:
        print(f"{done} answer(s) written to {args.out}", file=sys.stderr)
    return 0


class AnswerWriter:
    """Writes `dis predict`'s answers batch by batch, so a long run shows its answers as they
    come and a run stopped early keeps those written.

    Two formats. JSON Lines (`--out` ending in .jsonl): the header object on the first line,
    then one answer a line; valid after every line. Otherwise one JSON object, the header's
    keys then `predictions` (one answer a line, so that boards stay readable) and `complete`:
    in a file, each batch is written over the previous closing `], "complete": false}`, which
    it writes again after its answers, so the file is valid JSON after every batch and
    `complete` turns true when the last batch is in. On stdout the same object, closed once
    at the end."""

    def __init__(self, stream, head: dict, *, lines: bool, seekable: bool):
        self.stream, self.lines, self.seekable, self.count = stream, lines, seekable, 0
        if lines:
            self._emit(json.dumps(head) + "\n")
        else:
            self._emit(json.dumps(head, indent=1)[:-2] + ',\n "predictions": [\n' + (self._closing(False) if seekable else ""))

    @classmethod
    def open(cls, out: Path | None, head: dict) -> "AnswerWriter":
        if out is None:
            return cls(sys.stdout, head, lines=False, seekable=False)
        if out.parent != Path("."):
            out.parent.mkdir(parents=True, exist_ok=True)
        # Binary, so that the seeks below are byte offsets.
        return cls(open(out, "wb"), head, lines=out.suffix == ".jsonl", seekable=True)

    def _emit(self, text: str, rewind: int = 0) -> None:
        data = text.encode("utf-8") if self.seekable else text
        if rewind:
            self.stream.seek(-rewind, os.SEEK_END)
        self.stream.write(data)
        self.stream.flush()

    @staticmethod
    def _closing(complete: bool) -> str:
        return f'\n ],\n "complete": {"true" if complete else "false"}\n}}\n'

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.lines:
            self._emit("".join(json.dumps(r) + "\n" for r in rows))
        else:
            text = (",\n" if self.count else "") + ",\n".join("  " + json.dumps(r) for r in rows)
            if self.seekable:  # over the closing: the answers, then a closing the next batch writes over
                self._emit(text + self._closing(False), len(self._closing(False)))
            else:
                self._emit(text)
        self.count += len(rows)

    def close(self) -> None:
        if not self.lines:
            if self.seekable:
                self._emit(self._closing(True), len(self._closing(False)))
                self.stream.truncate()
            else:
                self._emit(self._closing(True))
        if self.stream is not sys.stdout:
            self.stream.close()

    def abandon(self) -> None:
        """Stopped early: what is written stays (a file reads `"complete": false`)."""
        if self.stream is not sys.stdout:
            self.stream.close()


COMMANDS = {"eval": cmd_eval, "predict": cmd_predict}
