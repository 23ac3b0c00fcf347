"""The component slots: one row per kind of component a recipe composes.

A row holds every name a kind has: where a recipe names it (`key`, a dotted path: `targets` is
the table `[targets]`, `train.optimizer` is `[train.optimizer]`), its registry kind, the pluggy
hook that registers it, the Protocol its factory's result must satisfy, whether the recipe holds
one component or a list, the component used when the recipe leaves the slot out, and the hook's
one-line description. The hookspecs, the registry, recipe resolution, building and `dis plugins`
all read this table: a new kind of component is one row here plus its Protocol.

Rows are built in order. The first is the task: every later factory sees it as `ctx.task`, and
its encoding as `ctx.spec`.
"""

from __future__ import annotations

import re
from typing import Any

import attrs


@attrs.frozen
class Slot:
    key: str  # recipe path of the component's table
    kind: str  # registry kind: names are unique per kind; `dis plugins` lists it
    hook: str  # pluggy hook, `register_<kind>s(register)`
    # What the factory returns: a Protocol, or its name in dis_core.contract.interfaces (imported when
    # first needed, so that `import dis_core` and `dis compare` do not import torch).
    protocol: type | str
    doc: str  # the hook's docstring
    default: str | None = None  # component name when the recipe leaves the slot out; None = required
    many: bool = False  # an array of tables (`[[evaluators]]`), each item a component of its own
    attr: str = ""  # attribute of the built `Components`; "" = the key's last part

    @property
    def attribute(self) -> str:
        return self.attr or self.key.rpartition(".")[2]

    def interface(self) -> Any:
        if isinstance(self.protocol, str):
            # A plain deferred import, not importlib by name: the layering test sees the
            # dependency (contract -> contract), and a circle through it would fail there.
            from dis_core.contract import interfaces

            return getattr(interfaces, self.protocol)
        return self.protocol

    def paths(self, value: Any) -> list[tuple[str, Any]]:
        """(component path, spec) of each component in the slot, given the slot's value: one
        for a single slot (`train.optimizer`), one per item for `many` (`evaluators[0]`, ...)."""
        if self.many:
            return [(f"{self.key}[{i}]", item) for i, item in enumerate(value)]
        return [(self.key, value)]


SLOTS: tuple[Slot, ...] = (
    Slot(key="task", kind="task", hook="register_tasks", protocol="Task",
         doc="Register puzzle tasks (data, encoding, splits). Factory returns a `Task`."),
    Slot(key="backbone", kind="backbone", hook="register_backbones", protocol="Backbone",
         doc="Register recursive backbones. Factory returns a `Backbone` (an nn.Module)."),
    Slot(key="targets", kind="target_generator", hook="register_target_generators", protocol="TargetGenerator",
         doc="Register intermediate-target generators. Factory returns a `TargetGenerator`.", default="final"),
    Slot(key="halting", kind="halting", hook="register_halting_strategies", protocol="HaltingStrategy",
         doc="Register halting strategies. Factory returns a `HaltingStrategy`.", default="fixed"),
    Slot(key="evaluators", kind="evaluator", hook="register_evaluators", protocol="Evaluator",
         doc="Register evaluators. Factory returns an `Evaluator`.", default="exact", many=True),
    Slot(key="train.optimizer", kind="optimizer", hook="register_optimizers", protocol="OptimizerFactory",
         doc="Register optimizers. Factory returns a callable `params -> torch.optim.Optimizer`.",
         default="adamw", attr="make_optimizer"),
    Slot(key="loggers", kind="logger", hook="register_loggers", protocol="Logger",
         doc="Register experiment trackers (TensorBoard, W&B, MLflow, ...). Factory returns a `Logger`.", many=True),
)


def slot_of(kind: str, slots: tuple[Slot, ...] = SLOTS) -> Slot:
    for slot in slots:
        if slot.kind == kind:
            return slot
    raise KeyError(f"no component slot of kind {kind!r}; kinds: {', '.join(s.kind for s in slots)}")


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parts(path: str) -> tuple[str | int, ...]:
    """A component path as keys and indices: 'evaluators[0].config' -> ('evaluators', 0, 'config')."""
    return tuple(int(index) if index else name for name, index in _PART.findall(path))


def value_at(obj: Any, path: str) -> Any:
    """What `path` names in a structured recipe (attributes) or a raw one (dicts and lists)."""
    for part in parts(path):
        obj = obj[part] if isinstance(part, int) or isinstance(obj, dict) else getattr(obj, part)
    return obj
