"""The `dis` command (and `dis-run`, short for `dis run`).

Exit statuses: 0 done; 2 a problem the user or the environment must fix (`UserError`, a broken
plugin, an OS error such as a full disk or a read-only directory, out of memory, another rank of
the run failing), one message and no traceback; 3 training diverged (`RunDiverged`: a non-finite
loss or gradient; the newest checkpoint holds the last good weights); 130 interrupted (Ctrl-C), 143
stopped by SIGTERM (both after a checkpoint when training). Only bugs produce tracebacks (status 1).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path

from dis_core.contract.errors import DisError, RecipeError, RunDirError, RunDiverged, UserError


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe TOML file, e.g. recipes/nqueens_quick.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.steps=100 (repeatable; values are TOML; "
                        "a relative path is relative to the current directory)")
    plugin_arg(p)


def plugin_arg(p: argparse.ArgumentParser) -> None:
    """`--plugin MODULE` (repeatable); `extra_plugins(args)` turns it into plugins to load."""
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                   help="load a plugin module for this command only: an importable module name or the path "
                        "of a .py file (repeatable), like pytest's -p")


def extra_plugins(args) -> tuple:
    """The modules `--plugin` names, for `load_registry(extra_plugins=...)`."""
    from dis_core.wiring.plugins import load_plugin_modules

    return load_plugin_modules(getattr(args, "plugins", None) or [])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dis", description="Deep Improvement Supervision for tiny recursive models")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and evaluate a recipe")
    _run_args(run)
    # A string, not a Path: Path("") is the current directory, and `--out ""` must be refused.
    run.add_argument("--out", default=None, help="run directory (default runs/<recipe>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out (default: the newest run of this recipe)")
    run.add_argument("--dry-run", action="store_true", help="build everything, print the resolved recipe and costs, do not train")
    run.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    run.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")
    run.add_argument("--init-from", type=Path, default=None, metavar="RUN_DIR|CHECKPOINT",
                     help="start from these weights (a dis run, checkpoint or portable folder, or an official step_N): fine-tuning; "
                          "a puzzle table of another size starts from the mean row (docs/checkpoints.md)")
    run.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)

    plugins = sub.add_parser("plugins", help="list installed components and the plugins providing them")
    plugins.add_argument("--json", action="store_true")
    plugin_arg(plugins)

    bench = sub.add_parser("bench", help="time training supervision steps of a recipe")
    _run_args(bench)
    bench.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")
    bench.add_argument("--eval", type=int, default=0, metavar="BATCHES",
                       help="also time this many evaluation batches: test examples/s and the time the whole test split takes")

    check = sub.add_parser("check", help="run every component of a recipe once on a tiny batch, checking what each returns")
    _run_args(check)
    check.add_argument("--batch", type=int, default=4, help="examples in the training step and the evaluation rollout")
    check.add_argument("--examples", default=None, metavar="CHOICE", help="the training examples whose target path is checked: "
                       "hardest (default: most cells to change), random[:SEED], first or ids:3,17,42")
    check.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")
    show = sub.add_parser("show", help="print examples with their per-step target path, as grids")
    _run_args(show)
    show.add_argument("--examples", default=None, metavar="CHOICE", help="which examples: hardest (default: most cells to "
                      "change), random[:SEED], first or ids:3,17,42; a number N: N examples (as -n N)")
    show.add_argument("-n", "--count", type=int, default=3, help="how many examples (default 3)")
    show.add_argument("--split", default="train", choices=["train", "test"])
    show.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")

    from dis_core.tools.compare import X_AXES  # stdlib and attrs only: cheap

    cmp_ = sub.add_parser("compare", help="compare finished runs: metrics against cost, table and plot")
    cmp_.add_argument("runs", nargs="+", type=Path)
    cmp_.add_argument("--metric", default=None, help="metric to plot, listed first (default: the first evaluator's headline metric)")
    cmp_.add_argument("--x", default="train_flops", choices=list(X_AXES),
                      help="the plot's x axis: a training cost (default train_flops)")
    cmp_.add_argument("--no-group", dest="group", action="store_false", help="one row per run instead of one per recipe (seeds pooled)")
    cmp_.add_argument("--per-step", action="store_true", help="also show per-step metrics such as exact/hamming@3")
    cmp_.add_argument("--out", type=Path, default=None, metavar="DIR",
                      help="write DIR/compare.md and DIR/compare.png (created); without it, only the table is printed")

    from dis_core import inference_cli  # `dis eval` and `dis predict` (issue 10); cheap to import

    inference_cli.add_parsers(sub)
    COMMANDS.update(inference_cli.COMMANDS)
    from dis_core.tools import adapt  # `dis adapt` (issue 23); cheap to import

    adapt.add_parsers(sub)
    COMMANDS.update(adapt.COMMANDS)
    from dis_core.tools import study  # `dis study` (issue 21); cheap to import

    study.add_parsers(sub)
    COMMANDS.update(study.COMMANDS)
    from dis_core.tools import checkpoint_io  # `dis import` / `dis export` (issue 20); cheap to import

    checkpoint_io.add_parsers(sub)
    COMMANDS.update(checkpoint_io.COMMANDS)
    return parser


def plugin_rows(registry) -> list[dict]:
    """`dis plugins --json`: a row per component, in the slot table's order (with the recipe key
    that names its kind), then a row per broken plugin."""
    from dis_core.wiring.registry import contract_notes

    notes: dict[tuple, list[str]] = {}
    for entry, note in contract_notes(registry):  # a plugin written against an older contract
        notes.setdefault((entry.kind, entry.name), []).append(note)
    rows = [{**e.record(), "doc": e.doc, "recipe_key": registry.slot(e.kind).key, "contract": notes.get((e.kind, e.name), [])}
            for e in registry.entries()]
    # A broken plugin's components are unknown: one row for the plugin, with "broken" set.
    rows += [{"kind": None, "name": None, "plugin": b.name, "version": b.version, "doc": "", "broken": b.error,
              "entry_point": b.entry_point, "distribution": b.distribution} for b in registry.broken]
    return rows


def cmd_plugins(args) -> int:
    from dis_core.wiring.plugins import load_registry

    registry = load_registry(extra_plugins=extra_plugins(args))
    entries, broken = registry.entries(), registry.broken
    if args.json:
        print(json.dumps(plugin_rows(registry), indent=2))
        return 0
    rows = [("KIND", "NAME", "PLUGIN", "VERSION", "DESCRIPTION")]
    rows += [(e.kind, e.name, e.plugin + (" (--plugin)" if e.loaded_by else ""), e.version or "-", e.doc) for e in entries]
    rows += [("BROKEN", "?", b.name, b.version or "-", f"failed to load: {b.error}") for b in broken]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    for b in broken:
        print(f"warning: {b.describe()} failed to load and is skipped: {b.error}", file=sys.stderr)
    return 0


def _check_paths(args) -> None:
    """Paths named on the command line, checked before anything is built."""
    recipe = Path(args.recipe)
    if recipe.is_dir():
        raise RecipeError([f"{recipe} is a directory, not a recipe file (e.g. {recipe / 'name.toml'})"], source=str(recipe))
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file, not a directory; pass a directory for the prepared task data")
    out = getattr(args, "out", None)
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file, not a directory; pass a directory path")


def _load(args):
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe

    _check_paths(args)
    registry = load_registry(extra_plugins=extra_plugins(args))
    if int(os.environ.get("RANK", "0")) == 0:
        for b in registry.broken:  # named once; only a recipe that needs the plugin fails
            print(f"warning: {b.describe()} failed to load and is skipped: {b.error}", file=sys.stderr)
    resolved = load_recipe(args.recipe, registry, args.overrides)
    args.resolved = resolved  # for the out-of-memory message
    return registry, resolved


def cmd_run(args) -> int:
    if args.out is not None:
        if not args.out:
            raise RunDirError('--out "" names no directory (an unset shell variable?); dis would write into the '
                              'current directory. Pass a directory path, or leave --out out for runs/<recipe>-<time>')
        args.out = Path(args.out)
    registry, resolved = _load(args)
    if args.dry_run:
        return _dry_run(args, registry, resolved)
    from dis_core.loop.preflight import PreflightError
    from dis_core.outputs.rundir import default_out, latest_run, open_run_dir, release_lock, remove_unused

    out = args.out
    if args.resume and out is None:
        out = latest_run(args.recipe)
        if out is None:
            raise RunDirError(f"--resume: there is no run of {args.recipe} to resume under runs/ (a runs/"
                              f"{Path(args.recipe).stem}-<date>-<time> started from this file); pass --out DIR")
    if out is None:
        out = default_out(args.recipe)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("with several processes pass --out DIR, so every rank writes to the same run directory")
    args.run_dir = out  # for the message of an interrupted run
    fresh = not out.exists()
    # Lock the directory first (a second run stops here, naming the holder), then check what it holds.
    open_run_dir(out, resume=args.resume, is_main=int(os.environ.get("RANK", "0")) == 0, command=" ".join(sys.argv))
    try:
        return _train(args, registry, resolved, out)
    except PreflightError:
        release_lock(out)
        if fresh:  # stopped before writing anything: leave no empty directory behind for the corrected command
            remove_unused(out)
        raise
    finally:
        release_lock(out)


def _train(args, registry, resolved, out: Path) -> int:
    from dis_core.contract.metrics import is_per_step
    from dis_core.loop.trainer import Trainer

    if args.resume:
        _check_resume_recipe(out, resolved)
    solver = None
    if getattr(args, "init_from", None) is not None and not args.resume:  # a resumed run has its own weights
        from dis_core.loop import engine as dist
        from dis_core.step.solver import Solver
        from dis_core.tools.checkpoint_io import init_weights

        solver = Solver.build(resolved, registry, args.data_dir, device=dist.pick_device())
        print(json.dumps(init_weights(solver, args.init_from)), file=sys.stderr)
    trainer = Trainer(resolved, registry, out, data_dir=args.data_dir, resume=args.resume, command=" ".join(sys.argv),
                      solver=solver)
    summary = trainer.fit(registry)
    if _rank_world()[0] == 0:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items() if not is_per_step(k)}
        print(json.dumps(shown, indent=2))
        print(f"run directory: {out}", file=sys.stderr)
    return 0


# What `--resume` lets change (docs/recipes.md#resuming); changing what a run trains is refused.
# Extending or re-pacing the run: its length, how often it evaluates, logs and checkpoints.
RESUME_EXTENDS = ("train.steps", "train.epochs", "train.eval_interval", "train.checkpoint_interval", "train.checkpoint_every",
                  "train.log_interval", "train.eval_limit", "train.eval_trajectories", "train.on_nonfinite",
                  "train.keep_checkpoints", "train.keep_best", "train.keep_best_mode")
# Memory and speed, not the training: the micro-batch (gradient accumulation over the same batch),
# the evaluation batch, CPU threads, the preflight, trackers. A run stopped for memory resumes smaller.
RESUME_MEMORY = ("train.micro_batch_size", "train.eval_batch_size", "train.threads", "train.activation_checkpointing",
                 "train.preflight", "loggers")
RESUME_MAY_CHANGE = RESUME_EXTENDS + RESUME_MEMORY
_ABSENT = object()


def _check_resume_recipe(out: Path, resolved) -> None:
    import tomllib

    from dis_core.loop.checkpoint import written

    saved_file = out / "recipe.toml"
    if not saved_file.exists():
        if not written(out / "checkpoints"):
            return  # stopped before writing it: nothing to keep to, the run starts again from step 0
        raise UserError(f"--resume: {out} has no recipe.toml; is it a dis run directory?")
    try:
        saved = tomllib.loads(saved_file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--resume: {saved_file} is not a readable recipe ({exc}); restore it, or start a new run "
                        f"with another --out") from None
    diffs = [(key, old, new) for key, old, new in _differences(saved, resolved.to_dict())
             if not any(key == k or key.startswith((f"{k}.", f"{k}[")) for k in RESUME_MAY_CHANGE)]
    if diffs:
        lines = "".join(f"\n  - {key}: was {_shown(old)}, now {_shown(new)}" for key, old, new in diffs)
        raise UserError(f"--resume: the recipe differs from the one saved in {saved_file}:{lines}\nResume with the recipe "
                        f"the run was started with (or {saved_file} itself), or start a new run with another --out")


def _differences(old, new, at: str = ""):
    """(key path, old value, new value) of every leaf that differs. Paths are compared resolved:
    a recipe typed as ../recipes/x.toml, or reached through a symlink, resolves its relative
    paths to other spellings of the same files."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from _differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{at}.{key}" if at else key)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from _differences(a, b, f"{at}[{i}]")
    elif old != new and not (isinstance(old, str) and isinstance(new, str) and os.path.isabs(old) and os.path.isabs(new)
                             and os.path.realpath(old) == os.path.realpath(new)):
        yield at, old, new


def _shown(value) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."


def _dry_run(args, registry, resolved) -> int:
    import tomli_w

    from dis_core.loop import preflight
    from dis_core.outputs.runinfo import recipe_method, static_figures
    from dis_core.step.devices import launch_world_size
    from dis_core.step.solver import Solver

    solver = Solver.build(resolved, registry, args.data_dir)
    comp = solver.components
    figures = static_figures(comp)
    figures["train_examples"] = len(comp.task.dataset("train"))
    figures["test_examples"] = len(comp.task.dataset("test"))
    method = recipe_method(resolved)
    # What the run would take and whether it fits, as a run reports it before its first step.
    checked = preflight.plan(resolved, solver, world=launch_world_size())
    if args.json:
        print(json.dumps({**figures, "method": method, "preflight": checked.as_dict(), "recipe": resolved.to_dict()}, indent=2))
        return 0
    print(f"# resolved recipe: {resolved.source}")
    print(tomli_w.dumps(resolved.to_dict()))
    print("# figures")
    for key, value in figures.items():
        print(f"{key:36s} {value:,.0f}" if isinstance(value, (int, float)) and value >= 1000 else f"{key:36s} {value}")
    print(f"{'method':36s} {method['method']} (step_input = {method['step_input']!r})")
    if method["note"]:
        print(f"note: {method['note']}")
    print("# preflight (per process; a run stops here, exit status 2, when it cannot fit)")
    print("\n".join(preflight.report(checked)))
    return 0


def cmd_bench(args) -> int:
    from dis_core.tools.bench import bench

    registry, resolved = _load(args)
    print(bench(resolved, registry, steps=args.steps, warmup=args.warmup, data_dir=args.data_dir, eval_batches=args.eval))
    return 0


def cmd_check(args) -> int:
    from dis_core.tools.kit import check_recipe, format_rows

    registry, resolved = _load(args)
    rows = check_recipe(resolved, registry, data_dir=args.data_dir, batch_size=args.batch, examples=args.examples)
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 2


def cmd_show(args) -> int:
    import shutil

    from dis_core.tools.kit import show_examples

    registry, resolved = _load(args)
    width = shutil.get_terminal_size((100, 24)).columns
    print(show_examples(resolved, registry, data_dir=args.data_dir, examples=args.examples, count=args.count, split=args.split,
                        width=width))
    return 0


def cmd_compare(args) -> int:
    from dis_core.tools.compare import compare

    print(compare(args.runs, metric=args.metric, out=args.out, x=args.x, group=args.group, per_step=args.per_step))
    return 0


COMMANDS = {"run": cmd_run, "plugins": cmd_plugins, "bench": cmd_bench, "compare": cmd_compare, "check": cmd_check, "show": cmd_show}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from dis_core.contract import logs

    # Once, by the application: to stderr (stdout stays clean for --json), quiet on ranks > 0.
    logs.configure(int(os.environ.get("RANK", "0")))
    try:
        return COMMANDS[args.command](args)
    except RunDiverged as exc:
        return _fail(f"{exc}", 3)
    except DisError as exc:  # UserError and its kin, broken plugins included
        return _fail(f"{exc}", 2)
    except OSError as exc:
        return _fail(os_error_message(exc), 2)
    except MemoryError as exc:
        return _fail(oom_message(exc, getattr(args, "resolved", None)), 2)
    except RuntimeError as exc:
        if _is_oom(exc):
            return _fail(oom_message(exc, getattr(args, "resolved", None)), 2)
        if _is_comm_failure(exc):
            return _fail(_peer_failure_message(exc), 2, tell_peers=False)
        _tell_peers(f"{type(exc).__name__}: {exc}")
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM while training (trainer.Interrupted)
        print(interrupted_message(args, exc), file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:  # the process group's threads end here, not at interpreter exit (SIGABRT): devices.end_processes
        if "dis_core.step.devices" in sys.modules:  # only commands that load torch start a group
            sys.modules["dis_core.step.devices"].end_processes()


def interrupted_message(args, exc: KeyboardInterrupt) -> str:
    """What stopped, what was kept, and the exact command that continues (or restarts) the run."""
    out = getattr(args, "run_dir", None)
    if args.command != "run" or out is None:
        return "interrupted"
    from dis_core.loop.checkpoint import find_latest

    parts = ["dis-run", args.recipe, "--out", str(out), "--resume"]
    parts += [a for s in args.overrides for a in ("--set", s)] + [a for m in args.plugins for a in ("--plugin", m)]
    if args.data_dir != Path("data"):
        parts += ["--data-dir", str(args.data_dir)]
    command = shlex.join(parts)
    if _rank_world()[1] > 1:
        command = f"the same launch command with --out {shlex.quote(str(out))} --resume"
    newest = find_latest(out / "checkpoints", _rank_world()[1]) if (out / "checkpoints").is_dir() else None
    if getattr(exc, "checkpoint", None) is not None:
        said = f"stopped by {signal.Signals(exc.signum).name} at step {exc.step}, after writing checkpoint {exc.checkpoint}"
    elif newest:
        said = f"interrupted; the newest checkpoint is {out / 'checkpoints' / newest}"
    else:
        return (f"interrupted before the run's first checkpoint; start it again from step 0 (its metrics rows are "
                f"dropped) with: {command}")
    return f"{said}. Continue with: {command}"


def _fail(message: str, status: int, *, tell_peers: bool = True) -> int:
    rank, world = _rank_world()
    prefix = f"rank {rank} of {world}: " if world > 1 else ""
    print(f"error: {prefix}{message}", file=sys.stderr)
    if tell_peers:
        _tell_peers(message)
    return status


# ------------------------------------------------------------------ OS errors and memory


def os_error_message(exc: OSError) -> str:
    """One line naming the path and what to do, for the OS errors users meet."""
    path = exc.filename if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return (f"no space left on the device while writing {path}: free some space, or put the run (--out) "
                f"or the prepared data (--data-dir) on another disk")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what.lower()}: {path}: choose a directory you can write to (--out, --data-dir) or fix its permissions"
    if exc.errno == errno.ENOTDIR:
        return f"{path}: not a directory (a file is in the way of a directory dis needs)"
    if exc.errno == errno.EISDIR:
        return f"{path}: is a directory, where a file is expected; move it away or name the file inside it"
    if exc.errno == errno.ENOENT:
        return f"{path}: no such file or directory"
    return f"{path}: {what}" if path else what


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def oom_message(exc: BaseException, resolved) -> str:
    """Name the size that failed and the batch that asked for it; suggest a smaller micro-batch."""
    text = str(exc)
    m = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]?i?B)", text) or re.search(r"allocate (\d+) bytes", text)
    size = (m.group(1) if not m.group(1).isdigit() else f"{int(m.group(1)) / 2**30:.2f} GiB") if m else "more memory than is free"
    if resolved is None:
        return f"out of memory (tried to allocate {size}); use a smaller batch"
    train, world = resolved.recipe.train, _rank_world()[1]
    share = train.global_batch_size // world
    micro = train.micro_batch_size if isinstance(train.micro_batch_size, int) else share
    smaller = max((d for d in range(1, micro) if share % d == 0 and d <= micro // 2), default=1)
    eval_batch = train.eval_batch_size or train.global_batch_size
    return (f"out of memory: tried to allocate {size} with train.global_batch_size = {train.global_batch_size} "
            f"(a micro-batch of {micro} of the {share} slots of each of {world} process(es)) and evaluation batches of "
            f"{eval_batch}. Use a smaller micro-batch, the same training by gradient accumulation: --set "
            f"train.micro_batch_size={smaller} (or \"auto\", which measures what fits), and for evaluation "
            f"--set train.eval_batch_size={max(world, eval_batch // 2)}")


# ------------------------------------------------------------------ several processes
# Best effort: a rank that fails leaves its reason in the process group's key-value store (held by
# rank 0), so that a rank whose next collective breaks can say which rank failed and why.


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _store():
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(datetime.timedelta(seconds=5))
    return store


def _tell_peers(message: str) -> None:
    try:
        store = _store()
        if store is not None:
            store.set(f"dis/failed/{_rank_world()[0]}", message[:500])
    except Exception:  # the store may be gone with rank 0
        pass


def _is_comm_failure(exc: BaseException) -> bool:
    if _rank_world()[1] < 2:
        return False
    text = str(exc)
    return any(s in text for s in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _peer_failure_message(exc: BaseException) -> str:
    rank, world = _rank_world()
    others = [r for r in range(world) if r != rank]
    reasons: dict[int, str] = {}
    try:
        store = _store()
        for r in others:
            key = f"dis/failed/{r}"
            if store is not None and store.check([key]):
                reasons[r] = store.get(key).decode("utf-8", "replace")
    except Exception:
        pass
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if reasons:
        said = "; ".join(f"rank {r} failed: {why}" for r, why in sorted(reasons.items()))
        return f"stopped because another process of the run failed. {said}"
    who = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"
    if rank != 0:
        who += " (rank 0 holds the run's rendezvous store; if it ended, its own output says why)"
    return (f"stopped because {who} ended without reporting an error (killed, out of memory, or started "
            f"without a launcher and stopped): see that process's output. The collective that broke: {first}")


def run_main() -> int:
    return main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
