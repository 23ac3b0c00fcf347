"""The model a recipe builds, as every path uses it: training (`dis_core.loop.trainer`), evaluation,
`dis eval` / `dis predict` / `dis_core.load` (`dis_core.tools.inference`), trajectory pictures,
`dis bench` and `dis check`.

A `Solver` holds the components the recipe built (task, backbone, target generator, halting,
evaluators, and any other kind the slot table declares), the puzzle table, the step rule, the
device and the precision. It is built once, by `Solver.build`, from a resolved recipe.

The precision is decided here and nowhere else (`devices.resolve_precision`): `bf16` is autocast
around every backbone call over fp32 weights. Every forward goes through `rollout` or the
training module `step_module` builds, and both take it from here, so no path (a checkpoint's
evaluation, `dis check`) runs a bf16 recipe in fp32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import attrs
import torch

from dis_core.step import devices as dist
from dis_core.step.accounting import StepCost
from dis_core.wiring.build import Components, build_components
from dis_core.contract.checks import Boundary
from dis_core.contract.errors import CapabilityError
from dis_core.contract.compat import puzzle_emb_ndim_of
from dis_core.step.puzzle_embedding import PuzzleEmbedding
from dis_core.step.supervision import Rollout, StepRule, SupervisedStep, autocast, rollout


def checkpoint_activations(backbone: torch.nn.Module) -> None:
    """`train.activation_checkpointing`: a backbone supports it with an `activation_checkpointing`
    attribute, which it reads in its forward (trm and hrm recompute the calls with gradient in the
    backward, `dis_plugins.backbones.layers.call`). Setting it is the Solver's only part."""
    if not hasattr(backbone, "activation_checkpointing"):
        raise CapabilityError(
            f"train.activation_checkpointing = true, but the backbone {type(backbone).__name__} does not support it: "
            f"it has no `activation_checkpointing` attribute to set (trm and hrm have one; a backbone adds it and, "
            f"when it is true, recomputes its calls in the backward, e.g. with torch.utils.checkpoint). Set "
            f"train.activation_checkpointing = false")
    backbone.activation_checkpointing = True


@attrs.frozen(kw_only=True, eq=False)  # one model: compared (and hashed) by identity
class Solver:
    """The model of a recipe, ready to train, evaluate or answer; `Solver.build` makes it."""

    components: Components  # everything the recipe built, one attribute per slot
    puzzle_emb: PuzzleEmbedding | None  # one row per puzzle id; None when the backbone takes none
    rule: StepRule  # the recipe's [supervision]: targets per step, step input, loss
    device: torch.device
    precision: str  # "bf16" (autocast around the backbone; weights stay fp32) or "fp32"
    boundary: Boundary  # the checks of what the task and the target generator hand in
    cost: StepCost  # network calls and FLOPs of one supervision step

    @classmethod
    def build(cls, resolved, registry, data_dir: Path | str = Path("data"), *, device: torch.device | None = None) -> "Solver":
        """Build the recipe's components, the puzzle table and the rule on `device` (default: the
        process's GPU, else the CPU). Seeds torch with `train.seed` first, so that every process
        and every later load of the run builds the same initial weights (a component that draws
        at build time draws the same)."""
        device = device if device is not None else dist.pick_device()
        train = resolved.recipe.train
        if device.type == "cpu" and train.threads:
            torch.set_num_threads(train.threads)  # the same kernels, the same sums, in training and after
        torch.manual_seed(train.seed)
        comp = build_components(resolved, registry, Path(data_dir), rank=dist.rank(), world_size=dist.world_size())
        spec, backbone = comp.task.spec, comp.backbone.to(device)
        if train.activation_checkpointing:
            checkpoint_activations(backbone)
        ndim = puzzle_emb_ndim_of(backbone)
        return cls(
            components=comp,
            puzzle_emb=PuzzleEmbedding(spec.num_puzzle_ids, ndim).to(device) if ndim else None,
            rule=StepRule.of(resolved.recipe.supervision),
            device=device,
            precision=dist.resolve_precision(train.precision, device),
            boundary=Boundary.of(comp, registry),
            cost=StepCost.of(backbone, spec.seq_len, comp.halting),
        )

    # -------------------------------------------------------------- what it is made of

    @property
    def recipe(self) -> Any:
        """The resolved recipe's content it was built from."""
        return self.components.resolved.recipe

    @property
    def backbone(self) -> torch.nn.Module:
        return self.components.backbone

    @property
    def halting(self) -> Any:
        return self.components.halting

    @property
    def task(self) -> Any:
        return self.components.task

    @property
    def spec(self) -> Any:
        return self.components.task.spec

    @property
    def evaluators(self) -> dict[str, Any]:
        return self.components.evaluators

    @property
    def targets(self) -> Any:
        return self.components.targets

    def dataset(self, split: str) -> Any:
        """The task's split "train" or "test"."""
        return self.components.task.dataset(split)

    # -------------------------------------------------------------- precision

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the backbone's matmuls run in."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self):
        """The autocast context every backbone call runs in."""
        return autocast(self.device, self.bf16)

    # -------------------------------------------------------------- running

    def step_module(self) -> SupervisedStep:
        """backbone + loss, in this precision: the module the training engine wraps."""
        return SupervisedStep(self.backbone, self.halting, self.rule, bf16=self.bf16)

    def puzzle_rows(self, puzzle_ids: torch.Tensor) -> torch.Tensor | None:
        """(B,) ids -> (B, E) rows of the puzzle table (trainable leaves in a training forward);
        None without a table."""
        return self.puzzle_emb(puzzle_ids) if self.puzzle_emb is not None else None

    def rollout(self, batch, **options) -> Rollout:
        """`supervision.rollout` of `batch` (tensors on this device) from a fresh state, with its
        puzzle rows and in this precision; `options`: rollout's keywords (max_steps, generator,
        guidance, readout, margin)."""
        return rollout(self.backbone, batch, self.rule, self.halting, puzzle_emb=self.puzzle_rows(batch["puzzle_ids"]),
                       bf16=self.bf16, **options)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Within the block the backbone and the puzzle table are in eval mode; their modes come
        back on exit."""
        modules = [m for m in (self.backbone, self.puzzle_emb) if m is not None]
        was = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(modules, was):
                m.train(mode)
