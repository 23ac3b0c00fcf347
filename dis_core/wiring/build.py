"""Turning a resolved recipe into components: look up, structure (done by recipe.py), call factories.

The slots (`dis_core.contract.slots`) are built in table order. The first is the task; every later
factory sees it (and its spec) through the BuildContext, and can build further components
through the registry with `ctx.build`. Factories also learn the process's rank and the world size
(the process group's; 0 and 1 before one starts or without one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from dis_core.contract.errors import UserError
from dis_core.contract.interfaces import BuildContext
from dis_core.wiring.recipe import ResolvedRecipe


class Components:
    """The built components: one attribute per slot, named by the slot table's `attr` column."""

    task: Any  # Task
    backbone: Any  # Backbone
    targets: Any  # TargetGenerator
    halting: Any  # HaltingStrategy
    evaluators: dict[str, Any]  # evaluator name -> Evaluator, in recipe order (a `many` slot)
    make_optimizer: Any  # OptimizerFactory
    resolved: ResolvedRecipe
    # Recipe path -> component ("task", "evaluators[0]", ...), in slot order: what code that
    # must handle every kind, those it does not know included, goes through (checkpoints, run.json).
    by_path: dict[str, Any]

    def __init__(self, parts: dict[str, Any], resolved: ResolvedRecipe, by_path: dict[str, Any] | None = None):
        vars(self).update(parts)
        self.resolved = resolved
        self.by_path = dict(by_path or {})

    def __repr__(self) -> str:
        return f"Components({', '.join(k for k in vars(self) if k not in ('resolved', 'by_path'))})"


def build_components(resolved: ResolvedRecipe, registry, data_dir: Path, *, rank: int = 0, world_size: int = 1) -> Components:
    """Every component of the recipe, in slot-table order; factories learn this process's `rank`
    and the run's `world_size` through the context (the Solver passes the process group's)."""
    recipe = resolved.recipe
    ctx = BuildContext(seed=recipe.train.seed, n_sup=recipe.supervision.n_sup, data_dir=Path(data_dir),
                       source=resolved.source, registry=registry, rank=rank, world_size=world_size)
    parts: dict[str, Any] = {}
    by_path: dict[str, Any] = {}
    for slot, path, spec in resolved.components():
        entry = registry.get(slot.kind, spec.name)
        built = registry.make(entry, resolved.configs[path], attrs.evolve(ctx, component=f"$.{path}"))
        by_path[path] = built
        if slot.many:
            parts.setdefault(slot.attribute, {})[spec.name] = built
        else:
            parts[slot.attribute] = built
        if slot is resolved.slots[0]:  # the task: every later factory sees it
            ctx = attrs.evolve(ctx, task=built, spec=built.spec)
    for slot in resolved.slots:
        if slot.many:
            parts.setdefault(slot.attribute, {})  # a `many` slot the recipe leaves empty
    comp = Components(parts, resolved, by_path)
    halting = parts.get("halting")
    if halting is not None and halting.max_steps > recipe.supervision.n_sup:
        raise UserError(
            f"{resolved.source}: halting allows {halting.max_steps} steps but supervision.n_sup is "
            f"{recipe.supervision.n_sup}; targets exist only for n_sup steps"
        )
    return comp
