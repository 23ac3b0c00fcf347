"""The `dis` command (and `dis-run`, short for `dis run`).

Errors the user can fix (`UserError`) become one clear message and exit status 2; only bugs
produce tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dis_core.errors import DisError, UserError


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe TOML file, e.g. recipes/nqueens_quick.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.steps=100 (repeatable; values are TOML)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dis", description="Deep Improvement Supervision for tiny recursive models")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and evaluate a recipe")
    _run_args(run)
    run.add_argument("--out", type=Path, default=None, help="run directory (default runs/<recipe>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out (default: the newest run of this recipe)")
    run.add_argument("--dry-run", action="store_true", help="build everything, print the resolved recipe and costs, do not train")
    run.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    run.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")
    run.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)

    plugins = sub.add_parser("plugins", help="list installed components and the plugins providing them")
    plugins.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="time training supervision steps of a recipe")
    _run_args(bench)
    bench.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")

    from dis_core.compare import X_AXES  # stdlib and attrs only: cheap

    cmp_ = sub.add_parser("compare", help="compare finished runs: metrics against cost, table and plot")
    cmp_.add_argument("runs", nargs="+", type=Path)
    cmp_.add_argument("--metric", default=None, help="metric to plot, listed first (default: the first evaluator's headline metric)")
    cmp_.add_argument("--x", default="train_flops", choices=list(X_AXES),
                      help="the plot's x axis: a training cost (default train_flops)")
    cmp_.add_argument("--no-group", dest="group", action="store_false", help="one row per run instead of one per recipe (seeds pooled)")
    cmp_.add_argument("--per-step", action="store_true", help="also show per-step metrics such as exact/hamming@3")
    cmp_.add_argument("--out", type=Path, default=None, metavar="DIR",
                      help="write DIR/compare.md and DIR/compare.png (created); without it, only the table is printed")
    return parser


def cmd_plugins(args) -> int:
    from dis_core.plugins import load_registry

    entries = load_registry().entries()
    if args.json:
        print(json.dumps([{"kind": e.kind, "name": e.name, "plugin": e.plugin, "version": e.version, "doc": e.doc} for e in entries], indent=2))
        return 0
    rows = [("KIND", "NAME", "PLUGIN", "VERSION", "DESCRIPTION")]
    rows += [(e.kind, e.name, e.plugin, e.version or "-", e.doc) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def _load(args):
    from dis_core.plugins import load_registry
    from dis_core.recipe import load_recipe

    registry = load_registry()
    return registry, load_recipe(args.recipe, registry, args.overrides)


def cmd_run(args) -> int:
    registry, resolved = _load(args)
    if args.dry_run:
        return _dry_run(args, registry, resolved)
    from dis_core.rundir import default_out, latest_run
    from dis_core.trainer import Trainer, _per_step

    out = args.out
    if args.resume and out is None:
        out = latest_run(args.recipe)
        if out is None:
            raise UserError(f"--resume: no earlier run of {args.recipe} under runs/; pass --out DIR")
    if out is None:
        out = default_out(args.recipe)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("with several processes pass --out DIR, so every rank writes to the same run directory")
    if not args.resume and (out / "checkpoints" / "latest").exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it or --out for a new directory")
    if args.resume:
        _check_resume_recipe(out, resolved)
    trainer = Trainer(resolved, registry, out, data_dir=args.data_dir, resume=args.resume, command=" ".join(sys.argv))
    summary = trainer.fit(registry)
    if trainer.rank == 0:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items() if not _per_step(k)}
        print(json.dumps(shown, indent=2))
        print(f"run directory: {out}", file=sys.stderr)
    return 0


def _check_resume_recipe(out: Path, resolved) -> None:
    import tomllib

    saved_file = out / "recipe.toml"
    if not saved_file.exists():
        raise UserError(f"--resume: {out} has no recipe.toml; is it a dis run directory?")
    saved = tomllib.loads(saved_file.read_text())
    now = resolved.to_dict()
    # Extending a run (more steps, other intervals) is fine; changing what it trains is not.
    allowed = {"steps", "epochs", "eval_interval", "checkpoint_interval", "log_interval", "eval_limit", "eval_batch_size"}
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key == "train":
            a, b = saved.get(key, {}), now.get(key, {})
            diffs += [f"train.{k}" for k in sorted(set(a) | set(b)) if k not in allowed and a.get(k) != b.get(k)]
        elif saved.get(key) != now.get(key):
            diffs.append(key)
    if diffs:
        raise UserError(f"--resume: the recipe differs from the one saved in {saved_file} at: {', '.join(diffs)}")


def _dry_run(args, registry, resolved) -> int:
    import tomli_w

    from dis_core.build import build_components
    from dis_core.trainer import static_figures

    comp = build_components(resolved, registry, args.data_dir)
    figures = static_figures(comp)
    figures["train_examples"] = len(comp.task.dataset("train"))
    figures["test_examples"] = len(comp.task.dataset("test"))
    if args.json:
        print(json.dumps({**figures, "recipe": resolved.to_dict()}, indent=2))
        return 0
    print(f"# resolved recipe: {resolved.source}")
    print(tomli_w.dumps(resolved.to_dict()))
    print("# figures")
    for key, value in figures.items():
        print(f"{key:36s} {value:,.0f}" if isinstance(value, (int, float)) and value >= 1000 else f"{key:36s} {value}")
    return 0


def cmd_bench(args) -> int:
    from dis_core.bench import bench

    registry, resolved = _load(args)
    print(bench(resolved, registry, steps=args.steps, warmup=args.warmup, data_dir=args.data_dir))
    return 0


def cmd_compare(args) -> int:
    from dis_core.compare import compare

    print(compare(args.runs, metric=args.metric, out=args.out, x=args.x, group=args.group, per_step=args.per_step))
    return 0


COMMANDS = {"run": cmd_run, "plugins": cmd_plugins, "bench": cmd_bench, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from dis_core import logs

    # Once, by the application: to stderr (stdout stays clean for --json), quiet on ranks > 0.
    logs.configure(int(os.environ.get("RANK", "0")))
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DisError as exc:  # broken plugin or similar: still no traceback, but a different code
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


def run_main() -> int:
    return main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
