"""The training loop: one optimizer step per supervision step, over a carry of slots.

Each step: (1) halted slots take the next examples of this rank's stream and get their per-step
targets; (2) every slot runs one supervision step against the target of its own step index;
(3) backward and optimizer step through DeepSpeed, then the puzzle-embedding sign-SGD step;
(4) the halting strategy marks slots done. With `fixed` halting all slots halt together, so a
batch runs its n_sup steps and is replaced whole; with `act` halted slots are replaced one by one
(the reference carry semantics).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from pathlib import Path

import attrs
import structlog
import torch

from dis_core import checkpoint, guards
from dis_core import engine as dist
from dis_core.accounting import Ledger, StepCost, per_example
from dis_core.build import Components, build_components
from dis_core.data import eval_chunks, fetch, make_stream
from dis_core.diagnostics import sample_indices, target_report
from dis_core.errors import UserError
from dis_core.interfaces import EvalRecord
from dis_core.logs import progress
from dis_core.plugins import installed_versions
from dis_core.recipe import ResolvedRecipe
from dis_core.rundir import RunDir
from dis_core.supervision import Carry, SupervisedStep, sequence_correct

log = structlog.get_logger()


def lr_at(t: int, base: float, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """The reference schedule; t counts optimizer steps from 1 (the first step gets base/warmup)."""
    if t < warmup:
        return base * t / warmup
    if decay == "constant":
        return base
    progress_ = min(1.0, (t - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_)))


def params_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def static_figures(comp: Components) -> dict:
    """What `--dry-run` reports: sizes and per-example compute."""
    spec = comp.task.spec
    cost = StepCost.of(comp.backbone, spec.seq_len, comp.halting)
    eval_steps = comp.halting.max_steps
    figures = {"params": count_params(comp.backbone), **per_example(cost, comp.halting.max_steps, eval_steps)}
    ndim = getattr(comp.backbone, "puzzle_emb_ndim", 0)
    if ndim:
        figures["puzzle_table_rows"] = spec.num_puzzle_ids
        figures["puzzle_table_bytes"] = spec.num_puzzle_ids * ndim * 4
    return figures


def _per_step(key: str) -> bool:
    """Per-step series such as `exact/hamming@3` stay in metrics.jsonl, off the console;
    `pass@K` is a headline metric, not a step."""
    name, at, step = key.rpartition("/")[2].partition("@")
    return bool(at) and step.isdigit() and name != "pass"


class Trainer:
    def __init__(self, resolved: ResolvedRecipe, registry, out: Path, *, data_dir: Path | None = None, resume: bool = False, command: str = ""):
        self.resolved, self.recipe = resolved, resolved.recipe
        self.train_cfg, self.sup = self.recipe.train, self.recipe.supervision
        self.device = dist.pick_device()
        dist.init_distributed(self.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        if self.device.type == "cpu" and self.train_cfg.threads:
            torch.set_num_threads(self.train_cfg.threads)
        self.run = RunDir(out, is_main=self.rank == 0)
        self.run.lock()  # reliability: one run per directory (rundir.py); a no-op when the CLI holds it
        self.precision = dist.resolve_precision(self.train_cfg.precision, self.device)

        torch.manual_seed(self.train_cfg.seed)  # identical initial weights on every rank
        self.comp = build_components(resolved, registry, data_dir or Path("data"))
        self.spec = self.comp.task.spec
        self.train_set = self.comp.task.dataset("train")
        self.test_set = self.comp.task.dataset("test")
        self.cost = StepCost.of(self.comp.backbone, self.spec.seq_len, self.comp.halting)

        self.model = SupervisedStep(
            self.comp.backbone, self.comp.halting, loss=self.sup.loss, n_sup=self.sup.n_sup,
            step_weights=self.sup.step_weights, step_input=self.sup.step_input,
        )
        if not self.comp.halting.uses_q_head:
            # No gradient ever reaches an unused Q-head, but DeepSpeed fills missing gradients
            # with zeros, so AdamW would decay it towards 0; the reference leaves it untouched.
            self.comp.backbone.q_head.requires_grad_(False)
        if self.recipe.targets.name == "final" and self.sup.step_input == "prediction":
            log.warning(
                "final targets with step_input = 'prediction': official TRM and HRM feed the question "
                "at every step; set supervision.step_input = 'question' for a TRM baseline"
            )
        optimizer = self.comp.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        ds_config = dist.deepspeed_config(
            self.recipe.deepspeed, global_batch=self.train_cfg.global_batch_size, world=self.world,
            precision=self.precision, grad_clip=self.train_cfg.grad_clip,
        )
        self.engine = dist.make_engine(self.model, optimizer, ds_config)
        self.dtype = next(self.engine.module.parameters()).dtype

        self.puzzle_emb = None
        ndim = getattr(self.comp.backbone, "puzzle_emb_ndim", 0)
        if ndim:
            from dis_core.puzzle_embedding import PuzzleEmbedding

            self.puzzle_emb = PuzzleEmbedding(self.spec.num_puzzle_ids, ndim).to(self.device)

        self.ema = None
        if self.train_cfg.ema > 0:
            from dis_core.ema import EMA

            self.ema = EMA(self.engine.module, decay=self.train_cfg.ema)

        self.local_batch = self.train_cfg.global_batch_size // self.world
        self.stream = make_stream(self.train_set, self.train_cfg.sampler, self.train_cfg.global_batch_size, self.rank, self.world, self.train_cfg.seed, self.recipe.task.name)
        self.generator = torch.Generator().manual_seed(self.train_cfg.seed * 1_000_003 + self.rank)
        self.carry = Carry.empty(self.engine.module.backbone, self.local_batch, self.spec.seq_len, self.sup.n_sup, self.device)
        self.ledger = Ledger()
        self.step = 0
        self.total_steps = self._total_steps()
        self.command = command
        self.resumed_from = None
        # reliability: non-finite loss/gradient check after each backward (guards.py)
        self.guard = guards.NonFiniteGuard(self.train_cfg.on_nonfinite, checkpoints=self.run.checkpoints)
        if resume:
            self._resume()

    # ------------------------------------------------------------------ setup helpers

    def _total_steps(self) -> int:
        if self.train_cfg.steps is not None:
            return self.train_cfg.steps
        # An epoch is one pass over the training examples, each run for its max_steps supervision
        # steps (exact for `fixed` halting; with ACT, halted slots take new data sooner).
        per_epoch = len(self.train_set) * self.comp.halting.max_steps / self.train_cfg.global_batch_size
        return max(1, math.ceil(self.train_cfg.epochs * per_epoch))

    def _resume(self) -> None:
        # reliability: the newest loadable checkpoint; unreadable newer ones are skipped and named
        tag, shared, mine, _skipped = checkpoint.load_newest(self.engine, self.run.checkpoints, self.world)
        self.step = shared["step"]
        self.ledger = Ledger(**shared["ledger"])
        self.ledger.examples = mine["examples"]
        if self.ema is not None:
            self.ema.load_state_dict(shared["ema"])
        if self.puzzle_emb is not None:
            self.puzzle_emb.load_state_dict(shared["puzzle_emb"])
        self.carry = Carry.from_state_dict({k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in mine["carry"].items()})
        self.carry.batch = {k: v.to(self.device) for k, v in self.carry.batch.items()}
        self.stream.load_state_dict(mine["stream"])
        self.generator.set_state(mine["generator"])
        self.run.truncate_metrics(self.step)
        self.resumed_from = tag
        log.info("resumed", checkpoint=str(self.run.checkpoints / tag), step=self.step)

    def save_checkpoint(self) -> Path:
        shared = {"step": self.step, "ledger": attrs.asdict(self.ledger)}
        if self.ema is not None:
            shared["ema"] = self.ema.state_dict()
        if self.puzzle_emb is not None:
            shared["puzzle_emb"] = self.puzzle_emb.state_dict()
        mine = {
            "carry": self.carry.state_dict(), "stream": self.stream.state_dict(), "generator": self.generator.get_state(),
            "examples": self.ledger.examples,
            # Lets anyone check that data-parallel ranks hold identical weights (tests do).
            "params_sha256": params_digest(self.engine.module),
        }
        if self.puzzle_emb is not None:
            mine["puzzle_emb_sha256"] = params_digest(self.puzzle_emb)
        # With EMA on, the weights to evaluate are the EMA ones (the reference saves only those);
        # the live weights stay in the DeepSpeed files so that training can resume.
        extra = {"ema_weights.pt": self.ema.model_state_dict(self.engine.module)} if self.ema is not None else None
        return checkpoint.save(self.engine, self.run.checkpoints, self.step, shared, mine, extra)

    def write_run_info(self, registry) -> None:
        self.run.create()
        self.run.write_recipe(self.resolved.to_dict())
        sample = fetch(self.train_set, sample_indices(len(self.train_set), 256, self.train_cfg.seed))
        frames = self.comp.targets(sample, self.sup.n_sup, torch.Generator().manual_seed(self.train_cfg.seed))
        self.targets_report = target_report(frames, sample["labels"])
        info = {
            "name": self.run.path.name,
            "recipe_source": self.resolved.source,
            "recipe": self.resolved.to_dict(),
            "command": self.command,
            "versions": installed_versions(),
            "plugins": [
                {"kind": e.kind, "name": e.name, "plugin": e.plugin, "version": e.version}
                for e in registry.entries()
            ],
            "world_size": self.world,
            "device": str(self.device),
            "precision": self.precision,
            "total_steps": self.total_steps,
            "train_examples": len(self.train_set),
            "sampler": self.stream.sampler,  # the training order train.sampler resolved to
            "test_examples": len(self.test_set),
            "targets_report": self.targets_report,
            "headline_metrics": [f"{n}/{ev.headline}" for n, ev in self.comp.evaluators.items() if getattr(ev, "headline", None)],  # recipe order (a dict would be key-sorted)
            **static_figures(self.comp),
        }
        self.run.write_json("run.json", info)
        log.info("targets", **{k: round(v, 3) for k, v in self.targets_report.items()})
        if getattr(self.comp.targets, "monotone", False) and self.targets_report["monotone_share"] < 1.0:
            log.warning(
                "target generator declares monotone paths, but some move away from y*",
                generator=self.recipe.targets.name, monotone_share=self.targets_report["monotone_share"],
            )

    # ------------------------------------------------------------------ training

    def _refill(self) -> int:
        rows = self.carry.halted.nonzero().flatten()
        k = len(rows)
        if k == 0:
            return 0
        new = fetch(self.train_set, self.stream.take(k), self.device)
        targets = self.comp.targets(new, self.sup.n_sup, self.generator).to(self.device)
        init = self.engine.module.backbone.initial_state(k)
        self.carry.refill(rows, new, targets, init)
        return k

    def _set_lr(self) -> float:
        """Write this step's learning rates; returns the schedule's scale (1.0 after warm-up)."""
        s = self.train_cfg.schedule
        scale = lr_at(self.step, 1.0, s.warmup_steps, self.total_steps, s.decay, s.min_lr_ratio)
        for group, base in zip(self.engine.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * scale
        return scale

    def train_step(self) -> dict[str, float]:
        fresh = self._refill()
        c = self.carry
        self.step += 1
        scale = self._set_lr()
        step_idx = c.steps + 1  # (B,) 1-based index of the step each slot is about to run
        frame = (step_idx.clamp(max=self.sup.n_sup) - 1).view(-1, 1, 1).expand(-1, 1, c.targets.shape[-1])
        targets = c.targets.gather(1, frame).squeeze(1)  # (B, L)
        emb = self.puzzle_emb(c.batch["puzzle_ids"]) if self.puzzle_emb is not None else None

        loss, y, z, logits, q, ce = self.engine(c.y, c.z, c.tokens, step_idx, targets, c.batch["labels"], c.batch["inputs"], emb)
        self.engine.backward(loss)
        # reliability (guards.py): a non-finite loss or gradient stops the run before the update, or
        # with train.on_nonfinite = "skip" drops the update and refills every slot with fresh examples.
        if not self.guard.check_step(self.step, loss, guards.grads_of(self.engine.module, self.puzzle_emb)):
            guards.drop_update(self.engine, self.puzzle_emb)
            self.carry.halted[:] = True
            self.ledger.add_step(self.cost, slots=self.train_cfg.global_batch_size, fresh=fresh)
            return {"_stats": torch.zeros(6), "lr": self.base_lrs[0] * scale}
        self.engine.step()
        if self.puzzle_emb is not None:
            self.puzzle_emb.step(self.train_cfg.puzzle_emb_lr * scale, self.train_cfg.puzzle_emb_weight_decay)
        if self.ema is not None:
            self.ema.update()

        with torch.no_grad():
            c.y, c.z = y.detach(), z.detach()
            c.steps = step_idx
            preds = logits.argmax(-1)
            c.tokens = preds if self.sup.step_input == "prediction" else c.batch["inputs"]
            c.halted = self.comp.halting.halt(c.steps, q.detach().float(), training=True, generator=self.generator)
            done = c.halted
            labels = c.batch["labels"]
            valid = labels != -100
            correct_cells = ((preds == labels) & valid).sum(-1).float()
            acc = correct_cells / valid.sum(-1).clamp_min(1)
            exact = sequence_correct(logits, labels).float()
            stats = torch.stack([
                loss.detach().float() * len(done),  # summed over slots (the loss is a per-slot mean)
                torch.tensor(float(len(done))),
                (acc * done).sum(), (exact * done).sum(), (c.steps.float() * done).sum(), done.sum().float(),
            ])
        self.ledger.add_step(self.cost, slots=self.train_cfg.global_batch_size, fresh=fresh)
        return {"_stats": stats, "lr": self.base_lrs[0] * scale}

    def _reduce_train(self, acc: torch.Tensor, lr: float) -> dict[str, float]:
        acc = dist.all_reduce_sum(acc.clone())
        loss_sum, slots, acc_sum, exact_sum, steps_sum, done = acc.tolist()
        # reliability: NaN when every step of the interval was skipped as non-finite (guards.py)
        out = {"train/loss": loss_sum / slots if slots else float("nan"), "train/lr": lr, "train/epoch": self.stream.epochs_done()}
        if done:
            out |= {"train/accuracy": acc_sum / done, "train/exact_accuracy": exact_sum / done, "train/steps": steps_sum / done}
        return out

    # ------------------------------------------------------------------ evaluation

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        """Every evaluator over the test split (or its first `eval_limit` examples)."""
        module = self.engine.module
        module.eval()
        if self.puzzle_emb is not None:
            self.puzzle_emb.eval()
        ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        for ev in self.comp.evaluators.values():
            ev.reset()
        size = len(self.test_set) if self.train_cfg.eval_limit is None else min(len(self.test_set), self.train_cfg.eval_limit)
        batch_size = self.train_cfg.eval_batch_size or self.train_cfg.global_batch_size
        batch_size = max(self.world, batch_size - batch_size % self.world)
        n_batches = math.ceil(size / batch_size)
        halting, n_max = self.comp.halting, self.comp.halting.max_steps
        with ctx, progress(n_batches, "eval", rank=self.rank, unit="batch") as bar:
            for idx, n_real in eval_chunks(size, batch_size, self.rank, self.world):
                batch = fetch(self.test_set, idx, self.device)
                B = len(idx)
                y, z = (t.to(self.dtype) for t in module.backbone.initial_state(B))
                tokens, steps = batch["inputs"], torch.zeros(B, dtype=torch.long, device=self.device)
                halted = torch.zeros(B, dtype=torch.bool, device=self.device)
                emb = self.puzzle_emb(batch["puzzle_ids"]).to(self.dtype) if self.puzzle_emb is not None else None
                preds_all, q_last = [], torch.zeros(B, device=self.device)
                for s in range(1, n_max + 1):
                    step = torch.full((B,), s, dtype=torch.long, device=self.device)
                    (y2, z2), logits, q = module.backbone((y, z), tokens, step, emb)
                    live = ~halted
                    pred = logits.argmax(-1)
                    prev = preds_all[-1] if preds_all else pred
                    pred = torch.where(live[:, None], pred, prev)  # a halted slot keeps its answer
                    preds_all.append(pred)
                    q_last = torch.where(live, q[:, 0].float(), q_last)
                    steps = steps + live.long()
                    y, z = y2, z2
                    tokens = pred if self.sup.step_input == "prediction" else batch["inputs"]
                    halted = halted | halting.halt(steps, q.float(), training=False, generator=self.generator)
                    if bool(halted.all()):
                        break
                preds = torch.stack(preds_all, 1)  # (B, steps run, L)
                if preds.shape[1] < n_max:  # pad with the final answer so every record has N frames
                    preds = torch.cat([preds, preds[:, -1:].expand(-1, n_max - preds.shape[1], -1)], 1)
                if n_real:
                    record = EvalRecord(
                        batch={k: v[:n_real].cpu() for k, v in batch.items()},
                        preds=preds[:n_real].cpu(), q_halt=q_last[:n_real].cpu(), steps=steps[:n_real].cpu(),
                    )
                    for ev in self.comp.evaluators.values():
                        ev.update(record)
                bar.update(1)
        module.train()
        if self.puzzle_emb is not None:
            self.puzzle_emb.train()
        metrics: dict[str, float] = {}
        for name, ev in self.comp.evaluators.items():
            states = dist.gather_objects(ev.state())
            if self.rank == 0:
                result = ev.compute(states, self.run.eval_dir(self.step, name))
                metrics |= {f"{name}/{k}": float(v) for k, v in result.items()}
        return metrics

    # ------------------------------------------------------------------ the loop

    def fit(self, registry, *, stop_after: int | None = None) -> dict:
        """Train to the end (or, for tests simulating a kill, stop after `stop_after` steps of
        this session without the final evaluation/checkpoint). Returns the summary on rank 0."""
        cfg = self.train_cfg
        self.write_run_info(registry)
        self.engine.module.train()
        log.info(
            "training", run=str(self.run.path), steps=self.total_steps, start=self.step, world=self.world,
            device=str(self.device), precision=self.precision, params=count_params(self.comp.backbone),
        )
        acc, session_steps = torch.zeros(6), 0
        last_eval = last_ckpt = None
        start_time = time.perf_counter() - self.ledger.wall_time_s
        with progress(self.total_steps, "train", rank=self.rank, unit="step", initial=self.step) as bar:
            while self.step < self.total_steps:
                out = self.train_step()
                acc += out["_stats"]
                session_steps += 1
                self.ledger.wall_time_s = time.perf_counter() - start_time
                if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                    metrics = self._reduce_train(acc, out["lr"])
                    self.run.log(self.step, "train", metrics | self._cost())
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
                    acc.zero_()
                bar.update(1)
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < self.total_steps:
                    self._log_eval(self.evaluate())
                    last_eval = self.step
                if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0:
                    self.save_checkpoint()
                    last_ckpt = self.step
                if stop_after is not None and session_steps >= stop_after:
                    return {}
        final = self.evaluate() if last_eval != self.step else {}
        self._log_eval(final)
        if last_ckpt != self.step:
            self.save_checkpoint()
        summary = {"step": self.step, **final, **self._cost(), "params": count_params(self.comp.backbone)}
        self.run.write_json("summary.json", summary)
        return summary

    def _cost(self) -> dict[str, float]:
        """The ledger with examples summed over ranks (each rank counts the slots it refilled).
        A collective: every rank calls it at the same points."""
        out = self.ledger.as_metrics()
        out["cost/examples"] = int(dist.all_reduce_sum(torch.tensor([self.ledger.examples], dtype=torch.float64)).item())
        return out

    def _log_eval(self, metrics: dict) -> None:
        cost = self._cost()
        if metrics and self.rank == 0:
            self.run.log(self.step, "eval", metrics | cost)
            shown = {k: round(v, 4) for k, v in metrics.items() if not _per_step(k)}
            log.info("eval", step=self.step, **shown)

