"""The training loop: one optimizer step per supervision step, over a carry of slots.

What a step *means* (targets, inputs, loss, how the carry advances) lives in
`dis_core.supervision`; evaluation in `dis_core.evaluation`. The trainer decides *when* things
happen: (1) halted slots take the next examples of this rank's stream and their target paths;
(2) every slot runs one supervision step; (3) backward and optimizer step through DeepSpeed,
then the puzzle table's sign-SGD step; (4) the halting strategy marks slots done. With `fixed`
halting all slots halt together, so a batch runs its n_sup steps and is replaced whole; with
`act` halted slots are replaced one by one (the reference carry semantics).

SIGINT (Ctrl-C) and SIGTERM (what schedulers and `timeout` send before SIGKILL) stop training
at the end of the step under way, after a checkpoint of it (`Interrupted`); a second one stops
at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from pathlib import Path

import structlog
import torch

from dis_core import checks, evaluation, guards, training_state, trajectories
from dis_core import engine as dist
from dis_core.accounting import Ledger, StepCost
from dis_core.build import build_components
from dis_core.data import fetch, make_stream
from dis_core.ema import EMA
from dis_core.loggers import LoggerSet
from dis_core.logs import progress
from dis_core.metrics import is_per_step
from dis_core.puzzle_embedding import PuzzleEmbedding
from dis_core.recipe import ResolvedRecipe
from dis_core.rundir import RunDir
from dis_core.runinfo import check_targets, count_params, recipe_method, run_info
from dis_core.schedule import set_lr
from dis_core.supervision import Carry, StepOut, StepRule, SupervisedStep, TrainStats

log = structlog.get_logger()
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training was stopped by a signal: `checkpoint` holds step `step`, or is None when a second
    signal stopped it at once. A KeyboardInterrupt, so that whatever handles Ctrl-C handles it."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}")


class Trainer:
    def __init__(self, resolved: ResolvedRecipe, registry, out: Path, *, data_dir: Path | None = None, resume: bool = False, command: str = ""):
        self.resolved, self.recipe, self.command = resolved, resolved.recipe, command
        self.train_cfg = cfg = self.recipe.train
        self.rule = StepRule.of(self.recipe.supervision)
        self.device = dist.pick_device()
        dist.init_distributed(self.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        if self.device.type == "cpu" and cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.run = RunDir(out, is_main=self.rank == 0)
        self.run.lock()  # one run per directory; a no-op when the CLI already holds it
        self.precision = dist.resolve_precision(cfg.precision, self.device)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.comp = build_components(resolved, registry, data_dir or Path("data"))
        self.boundary = checks.Boundary.of(self.comp, registry)  # plugin outputs checked where they enter
        self.run.loggers = LoggerSet(self.comp.loggers)  # [[loggers]]: fed by what the run directory writes (rank 0)
        self.spec = self.comp.task.spec
        self.train_set, self.test_set = self.comp.task.dataset("train"), self.comp.task.dataset("test")
        self.cost = StepCost.of(self.comp.backbone, self.spec.seq_len, self.comp.halting)
        self.engine = self._make_engine()
        ndim = self.comp.backbone.puzzle_emb_ndim
        self.puzzle_emb = PuzzleEmbedding(self.spec.num_puzzle_ids, ndim).to(self.device) if ndim else None
        self.ema = EMA(self.engine.module, decay=cfg.ema) if cfg.ema > 0 else None

        self.stream = make_stream(self.train_set, cfg.sampler, cfg.global_batch_size, self.rank, self.world, cfg.seed, self.recipe.task.name)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.rank)
        self.carry = Carry.empty(self.comp.backbone, cfg.global_batch_size // self.world, self.spec.seq_len, self.rule.n_sup, self.device)
        self.ledger, self.stats = Ledger(), TrainStats()
        self.step = 0
        self.total_steps = self._total_steps()
        self.resumed_from = None
        self.last_eval, self.last_eval_step = {}, None
        self.stop_signal: int | None = None  # set by a SIGINT/SIGTERM received during fit()
        self.guard = guards.NonFiniteGuard(cfg.on_nonfinite, newest_checkpoint=lambda: training_state.newest(self))
        if resume:
            self._resume()

    # ------------------------------------------------------------------ setup

    def _make_engine(self):
        comp, cfg = self.comp, self.train_cfg
        if not comp.halting.uses_q_head:
            # No gradient ever reaches an unused Q-head, but DeepSpeed fills missing gradients
            # with zeros, so AdamW would decay it towards 0; the reference leaves it untouched.
            comp.backbone.q_head.requires_grad_(False)
        note = recipe_method(self.resolved)["note"]
        if note:  # neither TRM nor DIS: allowed (a study may want it), but never silently
            log.warning(note)
        if cfg.compile:
            # In place (nn.Module.compile; a backbone may narrow it to its hot modules): parameter
            # names, checkpoints and EMA stay as they are, and the trainer's evaluations run
            # compiled too. `dis eval` / `dis predict` load the weights into an eager backbone.
            comp.backbone.compile()
        model = SupervisedStep(comp.backbone, comp.halting, self.rule, bf16=self.precision == "bf16")
        optimizer = comp.make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        ds_config = dist.deepspeed_config(
            self.recipe.deepspeed, global_batch=cfg.global_batch_size, world=self.world,
            precision=self.precision, grad_clip=cfg.grad_clip, micro_batch=cfg.micro_batch_size,
        )
        micro, accumulate = dist.accumulation(cfg.global_batch_size, self.world, cfg.micro_batch_size)
        self.micro_batches = [slice(i * micro, (i + 1) * micro) for i in range(accumulate)]
        return dist.make_engine(model, optimizer, ds_config)

    def _total_steps(self) -> int:
        if self.train_cfg.steps is not None:
            return self.train_cfg.steps
        # An epoch is one pass over the training examples, each run for its max_steps supervision
        # steps (exact for `fixed` halting; with ACT, halted slots take new data sooner).
        per_epoch = len(self.train_set) * self.comp.halting.max_steps / self.train_cfg.global_batch_size
        return max(1, math.ceil(self.train_cfg.epochs * per_epoch))

    # ------------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        self.resumed_from = training_state.restore(self)

    def save_checkpoint(self) -> Path:
        return training_state.save(self)

    # ------------------------------------------------------------------ one step

    def _refill(self) -> int:
        """Halted slots take the next examples of the stream and their target paths."""
        rows = self.carry.halted.nonzero().flatten()
        if len(rows) == 0:
            return 0
        new = fetch(self.train_set, self.stream.take(len(rows)), self.device, self.boundary.batch)
        targets = self.boundary.frames(self.comp.targets(new, self.rule.n_sup, self.generator), new).to(self.device)
        self.carry.refill(rows, new, targets, self.comp.backbone.initial_state(len(rows)))
        return len(rows)

    def train_step(self) -> StepOut | None:
        """One optimizer step; None when a non-finite step was skipped (`train.on_nonfinite`)."""
        fresh = self._refill()
        self.step += 1
        self.lr_scale = set_lr(self.engine.optimizer, self.base_lrs, self.step, self.train_cfg.schedule, self.total_steps)
        outs = []
        for i, rows in enumerate(self.micro_batches):  # one forward/backward per micro-batch
            emb = self.puzzle_emb(self.carry.batch["puzzle_ids"][rows]) if self.puzzle_emb is not None else None
            outs.append(self.engine(self.carry.step_in(self.rule, emb, rows)))
            self.engine.backward(outs[-1].loss)  # DeepSpeed scales by 1/accumulation steps
            if i < len(self.micro_batches) - 1:
                self.engine.step()  # only counts the micro-step: the update waits for the last one
        out = StepOut.cat(outs)
        self.ledger.add_step(self.cost, slots=self.train_cfg.global_batch_size, fresh=fresh)
        if not self.guard.check_step(self.step, out.loss, guards.grads_of(self.engine.module, self.puzzle_emb)):
            guards.drop_update(self.engine, self.puzzle_emb)
            self.engine.micro_steps += 1  # keep DeepSpeed's accumulation boundary in step with ours
            self.carry.halted[:] = True  # start over on fresh examples
            return None
        self.engine.step()
        if self.puzzle_emb is not None:
            self.puzzle_emb.step(self.train_cfg.puzzle_emb_lr * self.lr_scale, self.train_cfg.puzzle_emb_weight_decay)
        if self.ema is not None:
            self.ema.update()
        self.carry.advance(out, self.rule, self.comp.halting, self.generator)
        self.stats.add(out, self.carry)
        return out

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Every evaluator over the test split (or its first `eval_limit` examples), with the
        EMA weights when EMA is on. Metrics on rank 0, {} elsewhere."""
        module, cfg = self.engine.module, self.train_cfg
        module.eval()
        if self.puzzle_emb is not None:
            self.puzzle_emb.eval()
        try:
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                metrics = evaluation.evaluate(
                    module.backbone, self.puzzle_emb, self.test_set, self.comp.evaluators, self.rule, self.comp.halting,
                    batch_size=cfg.eval_batch_size or cfg.global_batch_size, limit=cfg.eval_limit, device=self.device,
                    generator=self.generator, out_dir=lambda name: self.run.eval_dir(self.step, name), check=self.boundary.batch,
                    bf16=self.precision == "bf16", **evaluation.options(self.recipe.eval),
                )
                trajectories.at_evaluation(self)  # train.eval_trajectories: pictures, also to the loggers
                return metrics
        finally:
            module.train()
            if self.puzzle_emb is not None:
                self.puzzle_emb.train()

    # ------------------------------------------------------------------ the loop

    def fit(self, registry, *, stop_after: int | None = None) -> dict:
        """Train to the end (or, for tests simulating a kill, stop after `stop_after` steps of
        this session without the final evaluation/checkpoint). Returns the summary on rank 0."""
        with self._stop_signals():
            return self._fit(registry, stop_after)

    def _fit(self, registry, stop_after: int | None) -> dict:
        cfg = self.train_cfg
        self.run.create()
        self.targets_report = check_targets(self.comp, self.train_set, self.recipe, self.boundary)
        # recipe.toml right before run.json: a recipe.toml without dis's run.json beside it is
        # taken for the user's own (rundir.is_run), and is never overwritten.
        self.run.write_recipe(self.resolved.to_dict())
        self.run.write_json("run.json", run_info(self, registry) | self._recipe_path())
        self.engine.module.train()
        log.info(
            "training", run=str(self.run.path), steps=self.total_steps, start=self.step, world=self.world,
            device=str(self.device), precision=self.precision, params=count_params(self.comp.backbone),
        )
        session_steps, last_eval, last_ckpt = 0, None, None
        start_time = time.perf_counter() - self.ledger.wall_time_s
        with progress(self.total_steps, "train", rank=self.rank, unit="step", initial=self.step) as bar:
            while self.step < self.total_steps:
                self.train_step()
                session_steps += 1
                self.ledger.wall_time_s = time.perf_counter() - start_time
                if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                    metrics = self._train_metrics()
                    self.run.log(self.step, "train", metrics | self._cost())
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
                bar.update(1)
                if (signum := self._stop_requested()) is not None:  # before an evaluation, which may be long
                    self._stop(signum, saved=False)
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < self.total_steps:
                    self._log_eval(self.evaluate())
                    last_eval = self.step
                if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0:
                    self.save_checkpoint()
                    last_ckpt = self.step
                if stop_after is not None and session_steps >= stop_after:
                    return {}
        if (signum := self._stop_requested()) is not None:  # received during the last step's evaluation or checkpoint
            self._stop(signum, saved=last_ckpt == self.step)
        final = self.evaluate() if last_eval != self.step else {}
        self._log_eval(final)
        if last_ckpt != self.step:
            self.save_checkpoint()
        summary = {"step": self.step, **final, **self._cost(), "params": count_params(self.comp.backbone)}
        self.run.write_json("summary.json", summary)
        return summary

    def _recipe_path(self) -> dict[str, str]:
        """run.json's `recipe_path`: the recipe file, absolute and through any symlink, so that
        `--resume` without `--out` finds this recipe's runs however its path is typed."""
        source = Path(self.resolved.source)
        return {"recipe_path": str(source.resolve())} if source.is_file() else {}

    # ------------------------------------------------------------------ stopping on a signal

    @contextlib.contextmanager
    def _stop_signals(self):
        """While training, SIGINT and SIGTERM only ask the loop to stop after the step under way
        (`_stop`); a second signal stops at once. The handlers in place before come back after."""
        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may install handlers: signals keep their usual effect
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def handler(signum, frame):
            if self.stop_signal is not None:
                raise Interrupted(signum, self.step, None)
            self.stop_signal = signum
            if self.rank == 0:
                # os.write, not print: the interrupted code may be inside a write to sys.stderr.
                with contextlib.suppress(OSError):
                    os.write(2, f"\n{signal.Signals(signum).name}: stopping at the end of this step, after writing "
                                f"a checkpoint (send it again to stop at once, without one)\n".encode())

        for s in STOP_SIGNALS:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)  # None: set outside Python

    def _stop_requested(self) -> int | None:
        """The signal asking training to stop, if any. With several processes a collective: a
        signal may reach one rank a step before another, and all must stop at the same step."""
        if self.world == 1:
            return self.stop_signal
        got = dist.all_reduce_sum(torch.tensor([1.0 if self.stop_signal else 0.0], device=self.device)).item()
        return (self.stop_signal or signal.SIGTERM) if got else None

    def _stop(self, signum: int, *, saved: bool):
        """Checkpoint the step just finished (unless it is) and stop; the CLI says how to resume."""
        path = training_state.newest(self) if saved else self.save_checkpoint()
        raise Interrupted(signum, self.step, path)

    def _train_metrics(self) -> dict[str, float]:
        """The `train/*` row since the last one (a collective)."""
        out = self.stats.reduce(dist.all_reduce_sum)
        self.stats = TrainStats()
        return out | {"train/lr": self.base_lrs[0] * self.lr_scale, "train/epoch": self.stream.epochs_done()}

    def _cost(self) -> dict[str, float]:
        """The ledger with examples summed over ranks (each rank counts the slots it refilled).
        A collective: every rank calls it at the same points."""
        out = self.ledger.as_metrics()
        out["cost/examples"] = int(dist.all_reduce_sum(torch.tensor([self.ledger.examples], dtype=torch.float64)).item())
        return out

    def _log_eval(self, metrics: dict) -> None:
        self.last_eval, self.last_eval_step = metrics, self.step
        best = self.train_cfg.keep_best
        if best and metrics and best not in metrics:
            log.warning("train.keep_best names no evaluation metric; keeping only the newest checkpoints",
                        keep_best=best, metrics=sorted(metrics)[:8])
        cost = self._cost()
        if metrics and self.rank == 0:
            self.run.log(self.step, "eval", metrics | cost)
            log.info("eval", step=self.step, **{k: round(v, 4) for k, v in metrics.items() if self._console_metric(k)})

    def _console_metric(self, key: str) -> bool:
        """The console shows the plain metrics and, of a guidance sweep, only each evaluator's
        headline per w (metrics.jsonl has them all); per-step rows are for files and plots."""
        if is_per_step(key):
            return False
        if "@w=" not in key:
            return True
        name, _, metric = key.partition("@w=")[0].partition("/")
        return name in self.comp.evaluators and metric == self.comp.evaluators[name].headline
