"""What a checkpoint holds of a training run besides the weights and the optimizer (`TrainState`),
and how a run saves and resumes it.

Shared by every rank (written in DeepSpeed's client state): the step, the cost ledger, the EMA
shadow, the puzzle table. Per rank: the carry of slots, the stream position, the halting/target
RNG, the examples this rank consumed, the state of every component that keeps one of its own (a
`Resumable`, whatever its kind), and digests that let anyone check that data-parallel ranks hold
identical weights. `dis_core.loop.checkpoint` does the crash-safe writing, the fallback past
unreadable checkpoints and the retention; DeepSpeed saves the module and the optimizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs
import structlog
import torch

from dis_core.loop import checkpoint
from dis_core.loop import engine as dist
from dis_core.step.accounting import Ledger
from dis_core.step.data import make_stream
from dis_core.loop.ema import EMA
from dis_core.contract.interfaces import Stream
from dis_core.step.puzzle_embedding import PuzzleEmbedding
from dis_core.step.supervision import Carry

log = structlog.get_logger()


@runtime_checkable
class Resumable(Protocol):
    """A component with a state of its own that a resumed run must get back (a curriculum's
    position, say). Modules are left out: their weights are the engine's to save."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@attrs.define(kw_only=True, eq=False)
class TrainState:
    step: int  # optimizer steps done
    carry: Carry  # the slots: their examples, target paths, states and steps run
    stream: Stream  # this rank's order of training examples, and how far it has got
    generator: torch.Generator  # the random draws of halting (exploration) and target generators
    ledger: Ledger  # cumulative cost (`examples`: this rank's)
    ema: EMA | None  # the averaged weights that evaluations and checkpoints use (train.ema)
    puzzle_emb: PuzzleEmbedding | None  # the solver's table: sign-SGD trains it, the optimizer does not
    resumable: dict[str, Resumable]  # the recipe's components that keep a state, by recipe path

    @classmethod
    def start(cls, solver, train, module: torch.nn.Module, *, rank: int, world: int) -> "TrainState":
        """Step 0 of a run of `solver` under the recipe's [train] table. `module` is the one the
        engine trains (the EMA averages its parameters, under its names)."""
        ema = EMA(module, decay=train.ema) if train.ema > 0 else None
        stream = make_stream(solver.dataset("train"), train.sampler, train.global_batch_size, rank, world, train.seed,
                             solver.recipe.task.name)
        generator = torch.Generator().manual_seed(train.seed * 1_000_003 + rank)
        slots = train.global_batch_size // world
        carry = Carry.empty(solver.backbone, slots, solver.spec.seq_len, solver.rule.n_sup, solver.device)
        resumable = {path: c for path, c in solver.components.by_path.items()
                     if isinstance(c, Resumable) and not isinstance(c, torch.nn.Module)}
        return cls(step=0, carry=carry, stream=stream, generator=generator, ledger=Ledger(), ema=ema,
                   puzzle_emb=solver.puzzle_emb, resumable=resumable)

    # -------------------------------------------------------------- as a checkpoint holds it

    def shared(self) -> dict[str, Any]:
        """What every rank holds alike."""
        out = {"step": self.step, "ledger": attrs.asdict(self.ledger)}
        if self.ema is not None:
            out["ema"] = self.ema.state_dict()
        if self.puzzle_emb is not None:
            out["puzzle_emb"] = self.puzzle_emb.state_dict()
        return out

    def per_rank(self) -> dict[str, Any]:
        """What is this rank's own."""
        out = {"carry": self.carry.state_dict(), "stream": self.stream.state_dict(), "generator": self.generator.get_state(),
               "examples": self.ledger.examples}
        if self.resumable:
            out["components"] = {path: c.state_dict() for path, c in self.resumable.items()}
        return out

    def load(self, shared: dict, mine: dict, device: torch.device) -> None:
        """Take the state a checkpoint holds (`shared` and this rank's `mine`)."""
        self.step = shared["step"]
        self.ledger = Ledger(**shared["ledger"])
        self.ledger.examples = mine["examples"]
        if self.ema is not None:
            self.ema.load_state_dict(shared["ema"])
        if self.puzzle_emb is not None:
            self.puzzle_emb.load_state_dict(shared["puzzle_emb"])
        self.carry = Carry.from_state_dict({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mine["carry"].items()})
        self.carry.batch = {k: v.to(device) for k, v in self.carry.batch.items()}
        self.stream.load_state_dict(mine["stream"])
        self.generator.set_state(mine["generator"])
        saved = mine.get("components", {})
        for path, component in self.resumable.items():
            if path in saved:
                component.load_state_dict(saved[path])
            else:  # a checkpoint written before the component kept a state
                log.warning("the checkpoint holds no state of this component: it starts afresh", component=path)


def save(state: TrainState, ds_engine, run, train, *, metrics: dict | None = None) -> Path:
    """Write `state`, the weights and the optimizer as checkpoint step_N of `run` (a RunDir), then
    apply the retention rules of the recipe's [train] table. `metrics`: this step's evaluation."""
    mine = state.per_rank() | {"params_sha256": checkpoint.params_digest(ds_engine.module)}
    if state.puzzle_emb is not None:
        mine["puzzle_emb_sha256"] = checkpoint.params_digest(state.puzzle_emb)
    # With EMA on, the weights to evaluate are the EMA ones (the reference saves only those);
    # the live weights stay in the DeepSpeed files so that training can resume.
    extra = {"ema_weights.pt": state.ema.model_state_dict(ds_engine.module)} if state.ema is not None else None
    path = checkpoint.save(ds_engine, run.checkpoints, state.step, state.shared(), mine, extra, metrics=metrics)
    if dist.rank() == 0:
        checkpoint.prune(run.checkpoints, dist.world_size(), keep=train.keep_checkpoints, best=train.keep_best,
                         mode=train.keep_best_mode)
    return path


def restore(state: TrainState, ds_engine, run, device: torch.device) -> str | None:
    """Load the newest loadable checkpoint of `run` into `state` and the engine (unreadable newer
    ones are skipped and named); returns its tag. A run stopped before its first checkpoint has
    nothing to load: it starts again from step 0 in the same directory, its metrics rows dropped
    (None)."""
    if not checkpoint.written(run.checkpoints):
        dropped = run.truncate_metrics(0)
        log.warning("no checkpoint to resume from: the run starts again from step 0 in place",
                    run=str(run.path), dropped_rows=dropped)
        return None
    tag, shared, mine, _skipped = checkpoint.load_newest(ds_engine, run.checkpoints, dist.world_size())
    state.load(shared, mine, device)
    run.truncate_metrics(state.step)
    log.info("resumed", checkpoint=str(run.checkpoints / tag), step=state.step)
    return tag


def newest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (a run's checkpoints/), if any."""
    tag = checkpoint.find_latest(root, dist.world_size()) if root.is_dir() else None
    return root / tag if tag else None
