"""What a run records about itself: sizes and per-example compute (`--dry-run` prints them),
run.json (versions, plugins, the components built, recipe, device, the target-path report), and
the summary of a run resumed after its end."""

from __future__ import annotations

import json
from pathlib import Path

import structlog
import torch

from dis_core.step.accounting import StepCost, per_example
from dis_core.contract.compat import headline_of, puzzle_emb_ndim_of
from dis_core.step.data import fetch
from dis_core.step.diagnostics import sample_indices, target_report
from dis_core.wiring.plugins import installed_versions
from dis_core.step.supervision import method

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
    ndim = puzzle_emb_ndim_of(comp.backbone)
    if ndim:
        figures["puzzle_table_rows"] = spec.num_puzzle_ids
        figures["puzzle_table_bytes"] = spec.num_puzzle_ids * ndim * 4
    return figures


def check_targets(solver, dataset) -> dict:
    """Per-step Hamming distance of the targets of 256 training examples to y*; warns when a
    generator that declares monotone paths is not monotone. The batch and the frames pass the
    solver's boundary checks."""
    recipe, boundary = solver.recipe, solver.boundary
    seed = recipe.train.seed
    sample = fetch(dataset, sample_indices(len(dataset), 256, seed), check=boundary.batch)
    frames = boundary.frames(solver.targets(sample, solver.rule.n_sup, torch.Generator().manual_seed(seed)), sample)
    report = target_report(frames, sample["labels"])
    log.info("targets", **{k: round(v, 3) for k, v in report.items()})
    if solver.targets.monotone and report["monotone_share"] < 1.0:
        log.warning(
            "target generator declares monotone paths, but some move away from y*",
            generator=recipe.targets.name, monotone_share=report["monotone_share"],
        )
    return report


def components(resolved, registry) -> list[dict]:
    """Each component the run built, in slot order, whatever its kind: its recipe path, kind,
    name and the plugin that provided it."""
    return [{"path": path, "kind": slot.kind, "name": spec.name, "plugin": registry.get(slot.kind, spec.name).plugin}
            for slot, path, spec in resolved.components()]


def run_info(solver, state, registry, *, run_name: str, command: str, world: int, total_steps: int,
             targets_report: dict, preflight: dict | None = None) -> dict:
    """The content of run.json, for a run of `solver` from `state` (a TrainState); `preflight`:
    what the preflight measured and chose (dis_core.loop.preflight)."""
    resolved = solver.components.resolved
    source = Path(resolved.source)
    return {
        "name": run_name,
        "recipe_source": resolved.source,
        "recipe": resolved.to_dict(),
        "command": command,
        "versions": installed_versions(),
        "plugins": [e.record() for e in registry.entries()],  # a --plugin module's rows say so
        "components": components(resolved, registry),
        "world_size": world,
        "device": str(solver.device),
        "precision": solver.precision,
        "sampler": state.stream.sampler,
        "total_steps": total_steps,
        "train_examples": len(solver.dataset("train")),
        "test_examples": len(solver.dataset("test")),
        "targets_report": targets_report,
        # Each evaluator's headline metric, in recipe order (`dis compare` plots the first);
        # an evaluator written before contract 1.1 may have none.
        "headline_metrics": [f"{name}/{h}" for name, ev in solver.evaluators.items() if (h := headline_of(ev))],
        # TRM, DIS or neither, from the targets and the step input (and which of them was chosen).
        "method": recipe_method(resolved),
        **static_figures(solver.components),
        # The micro-batch and evaluation batch chosen, the memory and time measured before the first step.
        **({"preflight": preflight} if preflight is not None else {}),
        # The recipe file, absolute and through any symlink, so that `--resume` without `--out`
        # finds this recipe's runs however its path is typed.
        **({"recipe_path": str(source.resolve())} if source.is_file() else {}),
    }


def finished_summary(run, step: int, params: int) -> dict | None:
    """The summary of a run resumed at its last step `step`, so that resuming it adds no second
    final evaluation: summary.json, or, when the run was killed between its final evaluation and
    writing that, rebuilt from the logged evaluation row (and written). None if the evaluation
    itself is missing. `run`: the RunDir."""
    summary_file = run.path / "summary.json"
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            summary = None
        if isinstance(summary, dict) and summary.get("step") == step:
            return summary
    row = run.eval_row(step)
    if row is None:
        return None
    summary = {"step": step, **{k: v for k, v in row.items() if k not in ("step", "split")}, "params": params}
    run.write_json("summary.json", summary)
    return summary
