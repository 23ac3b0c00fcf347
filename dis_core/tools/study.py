"""`dis study STUDY.toml`: compare recipes the way a result page needs, from one file.

A study file (docs/study.md) names the arms (a recipe each, plus `--set` overrides), the grid to
tune per arm, the seeds, the budget (overrides of every run, e.g. `train.steps`, so that arms get
equal compute) and the metric. The study then:

1. runs every arm's grid points on the first seed; each run evaluates on the task's validation
   split (`eval.split = "valid"`) and keeps its best-validation checkpoint (`train.keep_best`);
2. chooses each arm's point by that first seed's best validation score, and runs the other seeds
   there;
3. evaluates each run at the chosen point once on the test split, from its best-validation
   checkpoint (`dis eval CKPT --split test`);
4. writes the report (dis_core/tools/study_report.py): intervals over seeds, paired differences,
   collapse flags, costs.

Runs are `dis-run` subprocesses under `--out`, one directory each, at most `--workers` at once
with `train.threads` splitting the CPU cores. A finished run is skipped, an interrupted one
resumed, so running the same command again continues a study. This module is imported by the
`dis` parser: only the standard library and attrs at the top. The study file's format is in
dis_core/tools/study_file.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dis_core.contract.errors import UserError
from dis_core.tools.study_file import Arm, Study, StudyError, StudyFile, load_study, toml_value  # noqa: F401

DIS = (sys.executable, "-m", "dis_core.cli")  # the `dis` of this interpreter, whatever PATH says


# ---------------------------------------------------------------------------------------------
# The plan


@attrs.frozen
class Point:
    """One grid point of an arm: (key, value) in the grid's key order."""

    index: int
    values: tuple[tuple[str, Any], ...]

    def value(self, key: str) -> Any:
        return dict(self.values).get(key)

    @property
    def overrides(self) -> tuple[str, ...]:
        return tuple(f"{k}={toml_value(v)}" for k, v in self.values)

    @property
    def label(self) -> str:
        return ", ".join(self.overrides) or "(no grid)"


@attrs.frozen
class RunSpec:
    arm: str
    point: Point
    seed: int
    path: Path
    recipe: Path
    overrides: tuple[str, ...]  # in order: the arm's, the grid point's, the budget, the study's own


@attrs.frozen
class ArmPlan:
    index: int
    arm: Arm
    recipe: Path  # absolute
    points: tuple[Point, ...]
    slugs: tuple[str, ...]  # each point's part of the run names
    figures: tuple[dict, ...]  # each point's planned cost (`figures`)


@attrs.frozen
class Plan:
    study: Study
    out: Path
    arms: tuple[ArmPlan, ...]
    metric: str
    threads: int
    workers: int
    data_dir: Path

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.study.spec.seeds

    @property
    def mode(self) -> str:
        return self.study.spec.mode

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def run(self, arm: ArmPlan, point: int, seed: int) -> RunSpec:
        p = arm.points[point]
        own = (f"train.seed={seed}", 'eval.split="valid"', f"train.keep_best={toml_value(self.metric)}",
               f'train.keep_best_mode="{self.mode}"', f"train.checkpoint_interval={arm.figures[point]['eval_interval']}",
               "train.keep_checkpoints=1", f"train.threads={self.threads}")
        name = "-".join(s for s in (arm.arm.name, arm.slugs[point], f"s{seed}") if s)
        return RunSpec(arm=arm.arm.name, point=p, seed=seed, path=self.out / name, recipe=arm.recipe,
                       overrides=(*arm.arm.set, *p.overrides, *self.study.spec.budget, *own))


def _slugs(points: list[Point]) -> tuple[str, ...]:
    """Short run-name parts: `lr0.003` (the last part of each key and its value), or `p<i>` when
    two points would read alike."""
    keys = [k for k, _ in points[0].values]
    short = [k.rsplit(".", 1)[-1] for k in keys]
    short = short if len(set(short)) == len(short) else [k.replace(".", "_") for k in keys]
    slugs = tuple("_".join(re.sub(r"[^A-Za-z0-9.+=-]", "_", s + toml_value(v).strip('"')) for s, (_, v) in zip(short, p.values))
                  for p in points)
    return slugs if len(set(slugs)) == len(slugs) else tuple(f"p{p.index}" for p in points)


def make_plan(study: Study, out: Path, *, workers: int, threads: int | None, data_dir: Path, registry) -> Plan:
    """Every arm's grid points resolved and built once (their cost, metric and validation split
    checked), and the run directories already under `out` checked against what they would run now."""
    from dis_core.contract.errors import RecipeError
    from dis_core.wiring.recipe import load_recipe

    cores, out, data_dir = os.cpu_count() or 1, out.absolute(), data_dir.absolute()
    if workers < 1 or (threads is not None and threads < 1):
        raise UserError(f"--workers and --threads must be at least 1, got {workers} and {threads}")
    threads = threads or max(1, cores // workers)
    if workers * threads > cores:
        raise UserError(f"--workers {workers} x {threads} thread(s) each is more than this machine's {cores} CPU core(s); "
                        f"lower --workers (or --threads)")
    spec, folder = study.spec, study.path.parent.absolute()
    problems, arms = [], []
    with _chdir(folder):  # paths in overrides are relative to the study file, as in its runs
        for a, arm in enumerate(spec.arms):
            grid = list(arm.grid.items())
            points = [Point(i, tuple(zip([k for k, _ in grid], vs)))
                      for i, vs in enumerate(itertools.product(*[v for _, v in grid]))]
            figures = []
            for p in points:
                where = f"$.arms[{a}] (arm {arm.name!r}, recipe {arm.recipe}{', ' + p.label if grid else ''})"
                try:
                    resolved = load_recipe(folder / arm.recipe, registry, [*arm.set, *p.overrides, *spec.budget])
                    figures.append(figures_of(resolved, registry, data_dir))
                except RecipeError as exc:
                    problems += [f"{where}: {q}" for q in exc.problems]
                except UserError as exc:
                    problems.append(f"{where}: {exc}")
            if len(figures) == len(points):
                arms.append(ArmPlan(a, arm, (folder / arm.recipe).resolve(), tuple(points), _slugs(points), tuple(figures)))
        if problems:
            raise StudyError(problems, str(study.path))
        heads = {a.arm.name: (a.figures[0]["headlines"] or [None])[0] for a in arms}
        metric = spec.metric or next(iter(heads.values()))
        if spec.metric is None and (len(set(heads.values())) > 1 or metric is None):
            raise StudyError([f"the arms' headline metrics differ or are missing ({heads}); name one with `metric` @ $.metric"],
                             str(study.path))
        plan = Plan(study=study, out=out, arms=tuple(arms), metric=metric, threads=threads, workers=workers,
                    data_dir=data_dir)
        problems = [p for arm in plan.arms for i in range(len(arm.points)) for s in plan.seeds
                    for p in _stale(plan.run(arm, i, s), registry)]
    if problems:
        raise StudyError(problems, str(study.path))
    return plan


@contextlib.contextmanager
def _chdir(folder: Path):
    """contextlib.chdir, which Python 3.10 lacks."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def figures_of(resolved, registry, data_dir: Path) -> dict[str, Any]:
    """What one run of `resolved` costs, from the figures `dis-run --dry-run --json` prints:
    optimizer steps, training network calls and FLOPs (every slot runs one supervision step per
    optimizer step), the fewest examples it can consume (exact for fixed halting), its validation
    evaluations, and the evaluation cost per example; and the evaluators' headline metrics."""
    from dis_core.contract.compat import headline_of
    from dis_core.outputs.runinfo import static_figures
    from dis_core.wiring.build import build_components

    comp = build_components(resolved, registry, data_dir)
    fig = static_figures(comp)
    train_n = len(comp.task.dataset("train"))
    valid_n = len(comp.task.dataset("valid"))  # a task without one says so here, before anything runs
    t, max_steps = resolved.recipe.train, comp.halting.max_steps
    steps = t.steps or math.ceil(t.epochs * train_n * max_steps / t.global_batch_size)
    evals = (steps - 1) // t.eval_interval + 1 if t.eval_interval else 1
    per_eval = min(valid_n, t.eval_limit or valid_n)
    return {
        "optimizer_steps": steps,
        "network_calls": steps * t.global_batch_size * fig["network_calls_per_example_train"] / max_steps,
        "flops": steps * t.global_batch_size * fig["flops_per_example_train"] / max_steps,
        "examples_at_least": t.global_batch_size * math.ceil(steps / max_steps),
        "eval_interval": t.eval_interval, "evaluations": evals, "valid_examples": per_eval,
        "eval_calls_per_example": fig["network_calls_per_example_eval"], "eval_flops_per_example": fig["flops_per_example_eval"],
        "params": fig["params"], "puzzle_table_params": fig.get("puzzle_table_bytes", 0) // 4,
        "headlines": [f"{name}/{h}" for name, ev in comp.evaluators.items() if (h := headline_of(ev))],
    }


_ABSENT = object()


def _stale(run: RunSpec, registry) -> list[str]:
    """A run directory made by another plan (other recipe, overrides or budget): one line per
    differing key. `train.threads` may differ: it changes the speed only."""
    from dis_core.wiring.recipe import load_recipe

    saved_file = run.path / "recipe.toml"
    if not saved_file.is_file():
        return []
    saved = tomllib.loads(saved_file.read_text(encoding="utf-8"))
    now = load_recipe(run.recipe, registry, list(run.overrides)).to_dict()
    diffs = [(k, a, b) for k, a, b in _differences(saved, now) if k != "train.threads"]
    return [f"{run.path} was made by another plan ({k}: was {_shown(a)}, now {_shown(b)}); remove it or pass another --out"
            for k, a, b in diffs[:3]]


def _differences(old, new, at: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in dict.fromkeys([*old, *new]):
            yield from _differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{at}.{key}" if at else key)
    elif old != new and not (isinstance(old, str) and isinstance(new, str) and os.path.isabs(old) and os.path.isabs(new)
                             and os.path.realpath(old) == os.path.realpath(new)):
        yield at, old, new


def _shown(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)


# ---------------------------------------------------------------------------------------------
# Running it


@attrs.frozen
class SubprocessRunner:
    """Each training a `dis-run` process and each test evaluation a `dis eval` process, started
    in the study file's folder with `threads` threads, output to a log file."""

    threads: int
    data_dir: Path
    cwd: Path

    def train_command(self, run: RunSpec, resume: bool) -> list[str]:
        sets = [a for o in run.overrides for a in ("--set", o)]
        return [*DIS, "run", str(run.recipe), *sets, "--out", str(run.path), "--data-dir", str(self.data_dir),
                *(["--resume"] if resume else [])]

    def test_command(self, run: RunSpec, checkpoint: Path, out: Path) -> list[str]:
        return [*DIS, "eval", str(checkpoint), "--split", "test", "--out", str(out), "--set", f"train.threads={self.threads}",
                "--data-dir", str(self.data_dir)]

    def train(self, run: RunSpec, *, resume: bool, log: Path) -> int:
        return self._call(self.train_command(run, resume), log)

    def test(self, run: RunSpec, checkpoint: Path, out: Path, *, log: Path) -> int:
        return self._call(self.test_command(run, checkpoint, out), log)

    def _call(self, command: list[str], log: Path) -> int:
        from dis_core.step.devices import LAUNCHER_VARS

        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}  # never join another process group
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {shown_command(command)}\n")
            f.flush()
            return subprocess.run(command, cwd=self.cwd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def shown_command(command: list[str]) -> str:
    """A command as a user would type it: `dis-run ...` / `dis eval ...`."""
    rest = command[len(DIS):] if tuple(command[:len(DIS)]) == DIS else command
    return shlex.join(["dis-run", *rest[1:]] if rest[:1] == ["run"] else ["dis", *rest])


class Execution:
    """The study's jobs: the grid on the first seed, then per arm (once its grid is done) the other
    seeds at the chosen point, and a test evaluation of every run at the chosen point."""

    def __init__(self, plan: Plan, runner, echo=None):
        self.plan, self.runner = plan, runner
        self.echo = echo or (lambda text: print(text, file=sys.stderr, flush=True))
        self.pending = {a.arm.name: len(a.points) for a in plan.arms}
        self.chosen: dict[str, int | None] = {}
        self.failed: list[str] = []

    def first_jobs(self) -> list[tuple[str, RunSpec]]:
        seed = self.plan.seeds[0]
        width = max(len(a.points) for a in self.plan.arms)
        return [("train", self.plan.run(a, i, seed)) for i in range(width) for a in self.plan.arms if i < len(a.points)]

    def do(self, kind: str, run: RunSpec) -> None:
        from dis_core.tools.study_report import STATUS_SUFFIX, TEST_DIR, read_run

        plan, status = self.plan, self.plan.logs / (run.path.name + STATUS_SUFFIX)
        log = plan.logs / f"{run.path.name}{'' if kind == 'train' else '.test'}.log"
        if kind == "train":
            if (run.path / "summary.json").is_file() or (status.is_file() and json.loads(status.read_text()).get("rc") == 3):
                return  # finished, or diverged (a result too: never chosen)
            status.unlink(missing_ok=True)
            resume = run.path.exists()
            self.echo(f"{'resume' if resume else 'train'}: {run.path.name} ({run.point.label}, seed {run.seed}); log {log}")
            rc = self.runner.train(run, resume=resume, log=log)
            if rc:
                plan.logs.mkdir(parents=True, exist_ok=True)
                status.write_text(json.dumps({"rc": rc}) + "\n")
                if rc != 3:
                    self.failed.append(f"{run.path.name}: exit status {rc}, see {log}")
            self.echo(f"{'done' if rc == 0 else 'diverged' if rc == 3 else 'FAILED'}: {run.path.name}")
            return
        result = read_run(run.path, plan.metric, plan.mode, plan.logs)
        if result.status != "finished" or result.checkpoint is None or result.test is not None:
            return
        self.echo(f"test: {run.path.name} from {result.checkpoint.name}")
        rc = self.runner.test(run, result.checkpoint, run.path / TEST_DIR, log=log)
        if rc:
            self.failed.append(f"{run.path.name}: the test evaluation failed (exit status {rc}), see {log}")

    def after(self, kind: str, run: RunSpec) -> list[tuple[str, RunSpec]]:
        """The jobs that `run`'s job makes possible."""
        from dis_core.tools.study_report import choose, read_run

        plan = self.plan
        arm = next(a for a in plan.arms if a.arm.name == run.arm)
        if kind == "test":
            return []
        if run.seed != plan.seeds[0]:  # a seed at the chosen point
            return [("test", run)]
        self.pending[run.arm] -= 1
        if self.pending[run.arm]:
            return []
        tuned = [read_run(plan.run(arm, i, run.seed).path, plan.metric, plan.mode, plan.logs) for i in range(len(arm.points))]
        chosen = self.chosen[run.arm] = choose(tuned, plan.mode)
        if chosen is None:
            self.failed.append(f"arm {run.arm}: no grid point has a validation score on seed {run.seed}")
            return []
        self.echo(f"chosen for {run.arm}: {arm.points[chosen].label}")
        return [("test", plan.run(arm, chosen, run.seed)), *[("train", plan.run(arm, chosen, s)) for s in plan.seeds[1:]]]

    def run_all(self) -> None:
        with cf.ThreadPoolExecutor(max_workers=self.plan.workers) as pool:
            ready, running = self.first_jobs(), {}
            try:
                while ready or running:
                    while ready and len(running) < self.plan.workers:
                        job = ready.pop(0)
                        running[pool.submit(self.do, *job)] = job
                    done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for future in done:
                        job = running.pop(future)
                        future.result()
                        ready += self.after(*job)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def collect(plan: Plan, command: str) -> dict[str, Any]:
    """The report's data, read from the run directories (nothing is run)."""
    from dis_core.tools import study_report as sr
    from dis_core.tools.compare import choose_metric

    arms = []
    for arm in plan.arms:
        first = plan.seeds[0]
        tuning = [sr.read_run(plan.run(arm, i, first).path, plan.metric, plan.mode, plan.logs) for i in range(len(arm.points))]
        loaded = [r.run for r in tuning if r.run is not None and r.status == "finished"]
        if loaded:
            choose_metric(loaded, plan.metric)  # a metric no run evaluates: the error lists those they do
        chosen = sr.choose(tuning, plan.mode)
        seeds = {} if chosen is None else {
            s: sr.read_run(plan.run(arm, chosen, s).path, plan.metric, plan.mode, plan.logs) for s in plan.seeds}
        report = sr.arm_report(arm, plan.metric, plan.mode, tuning, chosen, seeds)
        report["planned_per_run"] = {k: v for k, v in arm.figures[chosen or 0].items() if k != "headlines"}
        arms.append(report)
    spec = plan.study.spec
    return {"name": plan.study.name, "description": spec.description, "study_file": str(plan.study.path),
            "command": command, "metric": plan.metric, "mode": plan.mode, "seeds": list(plan.seeds),
            "budget": list(spec.budget), "out": str(plan.out), "arms": arms, "paired": sr.paired(arms)}


def describe(plan: Plan, runner: SubprocessRunner) -> str:
    """The plan, every run with its command and overrides, and its cost (`--dry-run`)."""
    from dis_core.tools.compare import _flops, _si
    from dis_core.tools.study_report import choose, read_run

    spec, first = plan.study.spec, plan.seeds[0]
    lines = [f"study {plan.study.name} ({plan.study.path}): {len(plan.arms)} arm(s), seeds {', '.join(map(str, plan.seeds))}, "
             f"metric {plan.metric} ({'higher' if plan.mode == 'max' else 'lower'} is better), chosen on the validation split",
             f"runs under {plan.out}, {plan.workers} at a time with {plan.threads} thread(s) each "
             f"({os.cpu_count()} CPU core(s)); logs in {plan.logs}",
             f"budget, every run: {' '.join(spec.budget) or '(none)'}", ""]
    total = {"runs": 0, "optimizer_steps": 0.0, "flops": 0.0, "network_calls": 0.0}
    for arm in plan.arms:
        f = arm.figures[0]
        more = len(plan.seeds) - 1
        lines.append(f"arm {arm.arm.name} ({arm.recipe}): {len(arm.points)} grid point(s) on seed {first}, then "
                     f"{more} more seed(s) at the chosen point: {len(arm.points) + more} runs")
        lines.append(f"  per run: {f['optimizer_steps']:,} optimizer steps, {_si(f['network_calls'])} network calls, "
                     f"{_flops(f['flops'])} FLOPs, >= {f['examples_at_least']:,} examples; {f['evaluations']} validation "
                     f"evaluation(s) of {f['valid_examples']:,} examples; per example {_si(f['eval_calls_per_example'])} "
                     f"network calls, {_flops(f['eval_flops_per_example'])} FLOPs; {_si(f['params'])} parameters "
                     f"({_si(f['params'] + f['puzzle_table_params'])} with the puzzle table)")
        tuned = [read_run(plan.run(arm, i, first).path, plan.metric, plan.mode, plan.logs) for i in range(len(arm.points))]
        chosen = choose(tuned, plan.mode) if all(r.status in ("finished", "diverged") for r in tuned) else None
        runs = [plan.run(arm, i, first) for i in range(len(arm.points))]
        runs += [plan.run(arm, chosen, s) for s in plan.seeds[1:]] if chosen is not None else []
        for run in runs:
            state = ("done" if (run.path / "summary.json").is_file() else "resume" if run.path.exists() else "new")
            lines.append(f"  [{state}] {shown_command(runner.train_command(run, state == 'resume'))}")
        if chosen is None and more:
            lines.append(f"  then seeds {', '.join(map(str, plan.seeds[1:]))} at the chosen point "
                         f"({arm.arm.name}-<point>-s<seed>), with the same overrides")
        for i, fig in enumerate(arm.figures):
            n = (1 + (more if i == (chosen if chosen is not None else 0) else 0))
            total["runs"] += n
            for key in ("optimizer_steps", "flops", "network_calls"):
                total[key] += n * fig[key]
    lines += ["", "then each run at a chosen point is evaluated once on the test split, from its best-validation "
              "checkpoint: dis eval RUN/checkpoints/step_N --split test --out RUN/study_test",
              f"total: {total['runs']} trainings, {total['optimizer_steps']:,.0f} optimizer steps, "
              f"{_si(total['network_calls'])} network calls, {_flops(total['flops'])} training FLOPs"]
    return "\n".join(lines)


def run_study(path: str | Path, *, out: Path | None = None, workers: int = 1, threads: int | None = None,
              data_dir: Path = Path("data"), dry_run: bool = False, runner=None, registry=None, echo=None) -> str:
    """`dis study`: what it prints. `runner` (tests): an object with the `train` and `test`
    methods of `SubprocessRunner`."""
    from dis_core.tools import study_report

    study = load_study(path)
    if registry is None:
        from dis_core.wiring.plugins import load_registry

        registry = load_registry()
    out = Path(out) if out is not None else Path("runs/study") / study.name
    plan = make_plan(study, out, workers=workers, threads=threads, data_dir=Path(data_dir), registry=registry)
    default = SubprocessRunner(plan.threads, plan.data_dir, study.path.parent.absolute())
    if dry_run:
        return describe(plan, default)
    execution = Execution(plan, runner or default, echo)
    execution.run_all()
    command = shlex.join(["dis", "study", str(path), *([] if out == Path("runs/study") / study.name else ["--out", str(out)])])
    report = collect(plan, command)
    written = study_report.write(report, plan.out)
    text = study_report.markdown(report, None) + "\nwritten: " + ", ".join(map(str, written))
    if execution.failed:
        raise UserError(f"{len(execution.failed)} job(s) failed (the same command retries them); the report of the runs "
                        f"that finished is {written[0]}:\n" + "\n".join(f"  - {f}" for f in execution.failed))
    return text


# ---------------------------------------------------------------------------------------------
# Command line


def add_parsers(sub) -> None:
    p = sub.add_parser("study", help="tune and compare recipes over seeds, selecting on the validation split (docs/study.md)")
    p.add_argument("study", type=Path, metavar="STUDY.toml", help="a study file, e.g. studies/nqueens_dis_vs_trm.toml")
    p.add_argument("--workers", type=int, default=1, help="trainings at once (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="train.threads of every run (default: the CPU cores divided among the workers)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="run directories and the report (default runs/study/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, every run with its overrides, and its cost; train nothing")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")


def cmd_study(args) -> int:
    print(run_study(args.study, out=args.out, workers=args.workers, threads=args.threads, data_dir=args.data_dir,
                    dry_run=args.dry_run))
    return 0


COMMANDS = {"study": cmd_study}
