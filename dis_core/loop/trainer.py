"""The training loop: one optimizer step per supervision step, over a carry of slots.

The trainer decides *when* things happen; what it works on lives elsewhere: the model in a
`Solver` (dis_core.step.solver: components, puzzle table, step rule, device, precision), everything a
checkpoint holds in a `TrainState` (dis_core.loop.training_state), what a step *means* (targets,
inputs, loss, how the carry advances) in dis_core.step.supervision, evaluation in dis_core.loop.evaluation.
Each step: (1) halted slots take the next examples of this rank's stream and their target paths;
(2) every slot runs one supervision step; (3) backward and optimizer step through DeepSpeed,
then the puzzle table's sign-SGD step; (4) the halting strategy marks slots done. With `fixed`
halting all slots halt together, so a batch runs its n_sup steps and is replaced whole; with
`act` halted slots are replaced one by one (the reference carry semantics).

Before the first step a preflight (dis_core.loop.preflight) measures what the run needs and stops
it (exit 2) when it cannot fit; it chooses an "auto" micro-batch. Checkpoints come every
`train.checkpoint_interval` steps and every `train.checkpoint_every` of wall time. SIGINT (Ctrl-C)
and SIGTERM stop training at the end of the step under way, after a checkpoint of it
(dis_core.loop.stopping); a second one stops at once.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import structlog
import torch

from dis_core.loop import evaluation, guards, pace, preflight, training_state
from dis_core.outputs import trajectories
from dis_core.loop import engine as dist
from dis_core.step.data import fetch
from dis_core.outputs.loggers import LoggerSet
from dis_core.contract.logs import in_words, progress
from dis_core.contract.metrics import on_console
from dis_core.wiring.recipe import ResolvedRecipe, parse_duration
from dis_core.outputs.rundir import RunDir
from dis_core.outputs.runinfo import check_targets, count_params, finished_summary, recipe_method, run_info
from dis_core.loop.schedule import set_lr
from dis_core.step.solver import Solver
from dis_core.loop.stopping import Interrupted, StopSignals
from dis_core.step.supervision import StepOut, TrainStats
from dis_core.loop.training_state import TrainState

__all__ = ["Interrupted", "Trainer"]
log = structlog.get_logger()


class Trainer:
    """Trains `solver` (default: the one `resolved` builds) into the run directory `out`."""

    def __init__(self, resolved: ResolvedRecipe, registry, out: Path, *, data_dir: Path | None = None, resume: bool = False,
                 command: str = "", solver: Solver | None = None, max_wall_s: float | None = None):
        self.resolved, self.recipe, self.command = resolved, resolved.recipe, command
        self.max_wall_s = max_wall_s  # a budget of training wall time (the ledger's, so it spans resumes); None = none
        self.train_cfg = cfg = self.recipe.train
        device = solver.device if solver is not None else dist.pick_device()
        dist.init_distributed(device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.run = RunDir(out, is_main=self.rank == 0)
        self.run.lock()  # one run per directory; a no-op when the CLI already holds it
        self.solver = solver if solver is not None else Solver.build(resolved, registry, data_dir or Path("data"), device=device)
        self.run.loggers = LoggerSet(self.solver.components.loggers)  # [[loggers]]: fed by what the run directory writes (rank 0)
        self.train_set, self.test_set = self.solver.dataset("train"), self.solver.dataset(self.recipe.eval.split)  # eval.split: "test" or "valid"
        self.preflight = self._preflight()  # before the engine: it chooses the micro-batch
        self.engine = self._make_engine()
        self.state = TrainState.start(self.solver, cfg, self.engine.module, rank=self.rank, world=self.world)
        self.stats = TrainStats()
        self.total_steps = self.preflight.steps
        self.last_eval, self.last_eval_step = {}, None
        self.signals = StopSignals(rank=self.rank, world=self.world, device=device)
        self.guard = guards.NonFiniteGuard(cfg.on_nonfinite, newest_checkpoint=lambda: training_state.newest(self.run.checkpoints))
        self.resumed_from = training_state.restore(self.state, self.engine, self.run, device) if resume else None

    # ------------------------------------------------------------------ setup

    def _preflight(self) -> preflight.Preflight:
        """What the run needs, printed (rank 0); stops here, before anything trains, if it cannot fit."""
        pf = preflight.agree(preflight.plan(self.resolved, self.solver, world=self.world),
                             self.solver.device)
        if self.rank == 0:
            log.info("preflight\n" + "\n".join(f"  {line}" for line in preflight.report(pf, note=False)))
            if pf.note:
                log.warning(pf.note)
            if pf.unmeasured and self.train_cfg.preflight:  # the run goes on; a broken component fails it in its step
                log.warning(f"preflight: memory and time not measured ({pf.unmeasured})")
        self._long_run_said = pf.note is not None or self.solver.device.type != "cpu"
        if pf.problem:
            raise preflight.PreflightError(pf.problem)
        return pf

    def _make_engine(self):
        solver, cfg = self.solver, self.train_cfg
        note = recipe_method(self.resolved)["note"]
        if note:  # neither TRM nor DIS: allowed (a study may want it), but never silently
            log.warning(note)
        if cfg.compile:
            # In place (nn.Module.compile; a backbone may narrow it to its hot modules): parameter
            # names, checkpoints and EMA stay as they are, and the trainer's evaluations run
            # compiled too. `dis eval` / `dis predict` load the weights into an eager backbone.
            solver.backbone.compile()
        model = solver.step_module()  # freezes a q-head the halting strategy does not use: build the optimizer after
        optimizer = solver.components.make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        chosen = self.preflight.micro_batch  # train.micro_batch_size, or what "auto" chose
        ds_config = dist.deepspeed_config(self.recipe.deepspeed, global_batch=cfg.global_batch_size, world=self.world,
                                          grad_clip=cfg.grad_clip, micro_batch=chosen)
        micro, accumulate = dist.accumulation(cfg.global_batch_size, self.world, chosen)
        self.micro_batches = [slice(i * micro, (i + 1) * micro) for i in range(accumulate)]
        return dist.make_engine(model, optimizer, ds_config)

    def save_checkpoint(self) -> Path:
        metrics = self.last_eval if self.last_eval_step == self.state.step else None
        return training_state.save(self.state, self.engine, self.run, self.train_cfg, metrics=metrics)

    # ------------------------------------------------------------------ one step

    def _examples(self, k: int):
        """The indices of the next `k` training examples to enter the slots."""
        return self.state.stream.take(k)

    def _refill(self) -> int:
        """Halted slots take the next examples of the stream and their target paths."""
        carry, solver = self.state.carry, self.solver
        rows = carry.halted.nonzero().flatten()
        if len(rows) == 0:
            return 0
        new = fetch(self.train_set, self._examples(len(rows)), solver.device, solver.boundary.batch)
        targets = solver.boundary.frames(solver.targets(new, solver.rule.n_sup, self.state.generator), new).to(solver.device)
        carry.refill(rows, new, targets, solver.backbone.initial_state(len(rows)))
        return len(rows)

    def train_step(self) -> StepOut | None:
        """One optimizer step; None when a non-finite step was skipped (`train.on_nonfinite`)."""
        s, solver, cfg = self.state, self.solver, self.train_cfg
        fresh = self._refill()
        s.step += 1
        self.lr_scale = set_lr(self.engine.optimizer, self.base_lrs, s.step, cfg.schedule, self.total_steps)
        outs = []
        for i, rows in enumerate(self.micro_batches):  # one forward/backward per micro-batch
            emb = solver.puzzle_rows(s.carry.batch["puzzle_ids"][rows])
            outs.append(self.engine(s.carry.step_in(solver.rule, emb, rows)))
            self.engine.backward(outs[-1].loss)  # DeepSpeed scales by 1/accumulation steps
            if i < len(self.micro_batches) - 1:
                self.engine.step()  # only counts the micro-step: the update waits for the last one
        out = StepOut.cat(outs)
        s.ledger.add_step(solver.cost, slots=cfg.global_batch_size, fresh=fresh)
        if not self.guard.check_step(s.step, out.loss, guards.grads_of(self.engine.module, s.puzzle_emb)):
            guards.drop_update(self.engine, s.puzzle_emb)
            self.engine.micro_steps += 1  # keep DeepSpeed's accumulation boundary in step with ours
            s.carry.halted[:] = True  # start over on fresh examples
            return None
        self.engine.step()
        if s.puzzle_emb is not None:
            s.puzzle_emb.step(cfg.puzzle_emb_lr * self.lr_scale, cfg.puzzle_emb_weight_decay)
        if s.ema is not None:
            s.ema.update()
        s.carry.advance(out, solver.rule, solver.halting, s.generator)
        self.stats.add(out, s.carry)
        return out

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Every evaluator over the test split (or its first `eval_limit` examples), with the
        EMA weights when EMA is on, and `train.eval_trajectories` pictures. Metrics on rank 0,
        {} elsewhere."""
        solver, cfg, ema, step = self.solver, self.train_cfg, self.state.ema, self.state.step
        with solver.evaluating(), ema.applied() if ema is not None else contextlib.nullcontext():
            metrics = evaluation.evaluate(
                solver, self.test_set, batch_size=self.preflight.eval_batch, limit=cfg.eval_limit,
                generator=self.state.generator, out_dir=lambda name: self.run.eval_dir(step, name),
                check=solver.boundary.batch, **evaluation.options(self.recipe.eval),
            )
            if cfg.eval_trajectories and self.rank == 0:  # pictures, also to the loggers
                trajectories.at_evaluation(solver, self.test_set, cfg.eval_trajectories, self.run, step)
        return metrics

    # ------------------------------------------------------------------ the loop

    def fit(self, registry, *, stop_after: int | None = None) -> dict:
        """Train to the end (or, for tests simulating a kill, stop after `stop_after` steps of
        this session without the final evaluation/checkpoint). Returns the summary on rank 0.
        A resumed run that had finished already trains nothing and returns its summary."""
        if self.state.step >= self.total_steps:
            done = finished_summary(self.run, self.state.step, count_params(self.solver.backbone))
            if done is not None:
                log.info("the run finished already; nothing to do (train longer with --resume --set train.steps=N)",
                         run=str(self.run.path), step=self.state.step)
                return done
        with self.signals.listening(lambda: self.state.step):
            return self._fit(registry, stop_after)

    def _fit(self, registry, stop_after: int | None) -> dict:
        cfg, s = self.train_cfg, self.state
        self.run.create()
        targets_report = check_targets(self.solver, self.train_set)
        # recipe.toml right before run.json: a recipe.toml without dis's run.json beside it is
        # taken for the user's own (rundir.is_run), and is never overwritten.
        self.run.write_recipe(self.resolved.to_dict())
        self.run.write_json("run.json", run_info(self.solver, s, registry, run_name=self.run.path.name, command=self.command,
                                                 world=self.world, total_steps=self.total_steps, targets_report=targets_report,
                                                 preflight=self.preflight.as_dict()))
        self.engine.module.train()
        log.info("training", run=str(self.run.path), steps=self.total_steps, start=s.step, world=self.world,
                 device=str(self.solver.device), precision=self.solver.precision, params=count_params(self.solver.backbone),
                 micro_batch=self.preflight.micro_batch, checkpoint_every=cfg.checkpoint_every)
        session_steps, last_eval, last_ckpt = 0, None, None
        start_time = time.perf_counter() - s.ledger.wall_time_s
        self.pace = pace.Pace(s, total_steps=self.total_steps, eval_interval=cfg.eval_interval, world=self.world,
                              eval_estimate_s=self.preflight.seconds.get("evaluation", 0.0) / self.preflight.evaluations)
        every, last_ckpt_time = parse_duration(cfg.checkpoint_every), pace.now()
        with progress(self.total_steps, "train", rank=self.rank, unit="step", initial=s.step) as bar:
            bar.eta_s = self.pace.eta
            while s.step < self.total_steps and not self._out_of_time():
                self.train_step()
                session_steps += 1
                s.ledger.wall_time_s = time.perf_counter() - start_time
                if s.step % cfg.log_interval == 0 or s.step == self.total_steps:
                    metrics = self._train_metrics()
                    self.run.log(s.step, "train", metrics | self._cost())
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", **self.pace.postfix(), refresh=False)
                bar.update(1)
                self._say_if_long(session_steps)
                if (signum := self.signals.requested()) is not None:  # before an evaluation, which may be long
                    self._stop(signum, saved=False)
                if cfg.eval_interval and s.step % cfg.eval_interval == 0 and s.step < self.total_steps:
                    began = pace.now()
                    self._log_eval(self.evaluate())
                    self.pace.evaluated(pace.now() - began)
                    last_eval = s.step
                # The last step's checkpoint comes after its evaluation (below), so that it holds
                # that evaluation's metrics and `train.keep_best` can choose it.
                if s.step < self.total_steps and ((cfg.checkpoint_interval and s.step % cfg.checkpoint_interval == 0)
                                                  or self._checkpoint_due(every, last_ckpt_time)):
                    self.save_checkpoint()
                    last_ckpt, last_ckpt_time = s.step, pace.now()
                if stop_after is not None and session_steps >= stop_after:
                    return {}
        if (signum := self.signals.requested()) is not None:  # received during the last step's evaluation or checkpoint
            self._stop(signum, saved=last_ckpt == s.step)
        final = self.evaluate() if last_eval != s.step else {}
        self._log_eval(final)
        if last_ckpt != s.step:
            self.save_checkpoint()
        summary = {"step": s.step, **final, **self._cost(), "params": count_params(self.solver.backbone)}
        self.run.write_json("summary.json", summary)
        return summary

    def _out_of_time(self) -> bool:
        """Whether the wall-time budget (`max_wall_s`) is spent; then the run ends as at its last
        step (evaluation, checkpoint). With several processes a collective, as `_checkpoint_due`."""
        if self.max_wall_s is None:
            return False
        spent = self.state.ledger.wall_time_s >= self.max_wall_s
        if self.world == 1:
            return spent
        return dist.all_reduce_sum(torch.tensor([1.0 if spent else 0.0], device=self.solver.device)).item() > 0

    def _checkpoint_due(self, every: float | None, since: float) -> bool:
        """Whether `train.checkpoint_every` has passed since the last checkpoint; with several
        processes a collective (any rank's clock past it: all checkpoint at the same step)."""
        if every is None:
            return False
        due = pace.now() - since >= every
        if self.world == 1:
            return due
        return dist.all_reduce_sum(torch.tensor([1.0 if due else 0.0], device=self.solver.device)).item() > 0

    def _say_if_long(self, session_steps: int) -> None:
        """Once, from the pace of the first steps when no preflight said it: a run that will take
        more than a day on a CPU, and the recipe meant for this machine."""
        if self._long_run_said or session_steps < 3:
            return
        self._long_run_said = True
        eta = self.pace.eta()
        if eta is not None and eta > 86400 and self.rank == 0:
            log.warning(f"{in_words(eta)} to go on this CPU: the recipe is meant for GPUs; on this machine use "
                        f"{preflight.cpu_recipe(self.resolved)}")

    def _stop(self, signum: int, *, saved: bool):
        """Checkpoint the step just finished (unless it is) and stop; the CLI says how to resume."""
        path = training_state.newest(self.run.checkpoints) if saved else self.save_checkpoint()
        raise Interrupted(signum, self.state.step, path)

    # ------------------------------------------------------------------ what is logged

    def _train_metrics(self) -> dict[str, float]:
        """The `train/*` row since the last one (a collective)."""
        out = self.stats.reduce(dist.all_reduce_sum)
        self.stats = TrainStats()
        return out | {"train/lr": self.base_lrs[0] * self.lr_scale, "train/epoch": self.state.stream.epochs_done()}

    def _cost(self) -> dict[str, float]:
        """The ledger with examples summed over ranks (each rank counts the slots it refilled).
        A collective: every rank calls it at the same points."""
        ledger = self.state.ledger
        out = ledger.as_metrics()
        out["cost/examples"] = int(dist.all_reduce_sum(torch.tensor([ledger.examples], dtype=torch.float64)).item())
        return out

    def _log_eval(self, metrics: dict) -> None:
        step = self.state.step
        self.last_eval, self.last_eval_step = metrics, step
        best = self.train_cfg.keep_best
        if best and metrics and best not in metrics:
            log.warning("train.keep_best names no evaluation metric; keeping only the newest checkpoints",
                        keep_best=best, metrics=sorted(metrics)[:8])
        cost = self._cost()
        if metrics and self.rank == 0:
            self.run.log(step, "eval", metrics | cost)
            log.info("eval", step=step, **{k: round(v, 4) for k, v in metrics.items() if on_console(k, self.solver.evaluators)})
