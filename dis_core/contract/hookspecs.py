"""The plugin contract: one hook per component kind, generated from the slot table.

Every hook receives a `register` callback: `register(name, config_cls, factory)`.
`config_cls` is a frozen attrs class (the recipe's `config` table is structured into it);
`factory(config, ctx)` builds the component, where `ctx` is a `dis_core.contract.interfaces.BuildContext`.
The hooks (`register_tasks`, `register_backbones`, ...) are the `hook` column of
`dis_core.contract.slots.SLOTS`, each with the row's `doc` as its docstring. The long explanation of each
kind lives in docs/hooks.md; the interfaces in `dis_core.contract.interfaces` state shapes and ownership.
"""

from __future__ import annotations

import pluggy

from dis_core.contract.slots import SLOTS, Slot

PROJECT = "dis"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def _hookspec(slot: Slot):
    def hook(register):
        pass

    hook.__name__ = hook.__qualname__ = slot.hook
    hook.__doc__ = slot.doc
    hook.__module__ = __name__
    return hookspec(hook)


def specs_for(slots: tuple[Slot, ...]) -> type:
    """A namespace holding one hookspec per slot, for `PluginManager.add_hookspecs`."""
    return type("HookSpecs", (), {slot.hook: _hookspec(slot) for slot in slots})


# The builtin table's hooks as module functions: what `help(dis_core.contract.hookspecs)` and the docs
# tests read.
globals().update({slot.hook: _hookspec(slot) for slot in SLOTS})
