"""The plugin contract: one hook per component kind.

Every hook receives a `register` callback: `register(name, config_cls, factory)`.
`config_cls` is a frozen attrs class (the recipe's `config` table is structured into it);
`factory(config, ctx)` builds the component, where `ctx` is a `dis_core.interfaces.BuildContext`.
The long explanation of each kind lives in docs/hooks.md; the interfaces in
`dis_core.interfaces` state shapes and ownership.
"""

from __future__ import annotations

import pluggy

PROJECT = "dis"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_tasks(register):
    """Register puzzle tasks (data, encoding, splits). Factory returns a `Task`."""


@hookspec
def register_backbones(register):
    """Register recursive backbones. Factory returns a `Backbone` (an nn.Module)."""


@hookspec
def register_target_generators(register):
    """Register intermediate-target generators. Factory returns a `TargetGenerator`."""


@hookspec
def register_halting_strategies(register):
    """Register halting strategies. Factory returns a `HaltingStrategy`."""


@hookspec
def register_evaluators(register):
    """Register evaluators. Factory returns an `Evaluator`."""


@hookspec
def register_optimizers(register):
    """Register optimizers. Factory returns a callable `params -> torch.optim.Optimizer`."""
