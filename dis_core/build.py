"""Turning a resolved recipe into components: look up, structure (done by recipe.py), call factories.

The task is built first; every later factory sees it (and its spec) through the BuildContext.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from dis_core.errors import DisError, UserError
from dis_core.interfaces import BuildContext
from dis_core.recipe import ResolvedRecipe
from dis_core.registry import check_built


@attrs.define
class Components:
    task: Any
    backbone: Any
    targets: Any
    halting: Any
    evaluators: dict[str, Any]  # evaluator name -> evaluator, in recipe order
    make_optimizer: Any
    resolved: ResolvedRecipe


def _call(registry, kind: str, key: str, resolved: ResolvedRecipe, ctx: BuildContext):
    name, config = resolved.component(key)
    entry = registry.get(kind, name)
    where = "$.train.optimizer" if key == "optimizer" else f"$.{key}"
    try:
        built = entry.factory(config, attrs.evolve(ctx, component=where))
    except DisError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Factories validate combinations their config class cannot (e.g. heads vs hidden size).
        raise UserError(f"{resolved.source}: cannot build {kind} {name!r} @ {where}: {exc}") from exc
    return check_built(entry, built, where)  # the right kind of object, or a PluginError naming the plugin


def build_components(resolved: ResolvedRecipe, registry, data_dir: Path) -> Components:
    recipe = resolved.recipe
    ctx = BuildContext(seed=recipe.train.seed, n_sup=recipe.supervision.n_sup, data_dir=Path(data_dir))
    task = _call(registry, "task", "task", resolved, ctx)
    ctx = attrs.evolve(ctx, task=task, spec=task.spec)
    backbone = _call(registry, "backbone", "backbone", resolved, ctx)
    targets = _call(registry, "target_generator", "targets", resolved, ctx)
    halting = _call(registry, "halting", "halting", resolved, ctx)
    evaluators = {}
    for i, spec in enumerate(recipe.evaluators):
        evaluators[spec.name] = _call(registry, "evaluator", f"evaluators.{i}", resolved, ctx)
    make_optimizer = _call(registry, "optimizer", "optimizer", resolved, ctx)
    if halting.max_steps > recipe.supervision.n_sup:
        raise UserError(
            f"{resolved.source}: halting allows {halting.max_steps} steps but supervision.n_sup is "
            f"{recipe.supervision.n_sup}; targets exist only for n_sup steps"
        )
    return Components(task, backbone, targets, halting, evaluators, make_optimizer, resolved)
