"""What a run records about itself: sizes and per-example compute (`--dry-run` prints them), and
run.json (versions, plugins, recipe, device, the target-path report)."""

from __future__ import annotations

import structlog
import torch

from dis_core.accounting import StepCost, per_example
from dis_core.checks import Boundary
from dis_core.data import fetch
from dis_core.diagnostics import sample_indices, target_report
from dis_core.plugins import installed_versions
from dis_core.supervision import method

log = structlog.get_logger()


def recipe_method(resolved) -> dict:
    """`supervision.method` of a resolved recipe, with its step input."""
    r = resolved.recipe
    return {**method(r.targets.name, r.supervision.step_input), "step_input": r.supervision.step_input}


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def static_figures(comp) -> dict:
    """Parameters, network calls and FLOPs per example, and the puzzle table's size."""
    spec = comp.task.spec
    cost = StepCost.of(comp.backbone, spec.seq_len, comp.halting)
    figures = {"params": count_params(comp.backbone), **per_example(cost, comp.halting.max_steps, comp.halting.max_steps)}
    ndim = comp.backbone.puzzle_emb_ndim
    if ndim:
        figures["puzzle_table_rows"] = spec.num_puzzle_ids
        figures["puzzle_table_bytes"] = spec.num_puzzle_ids * ndim * 4
    return figures


def check_targets(comp, dataset, recipe, boundary: Boundary | None = None) -> dict:
    """Per-step Hamming distance of the targets of 256 training examples to y*; warns when a
    generator that declares monotone paths is not monotone. The batch and the frames pass the
    boundary checks (`boundary` names the plugins; by default only the components)."""
    boundary = boundary or Boundary.of(comp)
    seed = recipe.train.seed
    sample = fetch(dataset, sample_indices(len(dataset), 256, seed), check=boundary.batch)
    frames = boundary.frames(comp.targets(sample, recipe.supervision.n_sup, torch.Generator().manual_seed(seed)), sample)
    report = target_report(frames, sample["labels"])
    log.info("targets", **{k: round(v, 3) for k, v in report.items()})
    if comp.targets.monotone and report["monotone_share"] < 1.0:
        log.warning(
            "target generator declares monotone paths, but some move away from y*",
            generator=recipe.targets.name, monotone_share=report["monotone_share"],
        )
    return report


def run_info(trainer, registry) -> dict:
    """The content of run.json."""
    t = trainer
    return {
        "name": t.run.path.name,
        "recipe_source": t.resolved.source,
        "recipe": t.resolved.to_dict(),
        "command": t.command,
        "versions": installed_versions(),
        "plugins": [e.record() for e in registry.entries()],  # a --plugin module's rows say so
        "world_size": t.world,
        "device": str(t.device),
        "precision": t.precision,
        "sampler": t.stream.sampler,
        "total_steps": t.total_steps,
        "train_examples": len(t.train_set),
        "test_examples": len(t.test_set),
        "targets_report": t.targets_report,
        # Each evaluator's headline metric, in recipe order (`dis compare` plots the first).
        "headline_metrics": [f"{name}/{ev.headline}" for name, ev in t.comp.evaluators.items()],
        # TRM, DIS or neither, from the targets and the step input (and which of them was chosen).
        "method": recipe_method(t.resolved),
        **static_figures(t.comp),
    }
