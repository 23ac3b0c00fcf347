"""A flat registry of components keyed by (kind, name).

Each entry holds the component's frozen attrs config class, its factory and the plugin that
provided it. Plugins never touch the dictionaries: they call the `register` callback that
`Registry.collect` hands to their hook, which checks what it is given.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from dis_core.errors import DuplicateComponentError, PluginError, UnknownComponentError

# hook name -> component kind, in the order `dis plugins` lists them.
KINDS: dict[str, str] = {
    "register_tasks": "task",
    "register_backbones": "backbone",
    "register_target_generators": "target_generator",
    "register_halting_strategies": "halting",
    "register_evaluators": "evaluator",
    "register_optimizers": "optimizer",
}


@attrs.frozen
class Entry:
    kind: str
    name: str
    config_cls: type
    factory: Callable[..., Any]
    plugin: str
    version: str | None = None
    doc: str = ""


class Registry:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}

    def add(self, entry: Entry) -> None:
        key = (entry.kind, entry.name)
        if key in self._entries:
            raise DuplicateComponentError(entry.kind, entry.name, self._entries[key].plugin, entry.plugin)
        self._entries[key] = entry

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self._entries[(kind, name)]
        except KeyError:
            raise UnknownComponentError(kind, name, self.names(kind)) from None

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._entries if k == kind)

    def entries(self) -> list[Entry]:
        order = list(KINDS.values())
        return sorted(self._entries.values(), key=lambda e: (order.index(e.kind), e.name))

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    @classmethod
    def collect(cls, pm) -> "Registry":
        """Call every registration hook of the plugin manager and fill a fresh registry."""
        from dis_core.plugins import plugin_label, plugin_version

        reg = cls()
        for hook_name, kind in KINDS.items():
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                label = plugin_label(pm, impl.plugin)
                version = plugin_version(pm, impl.plugin)

                def register(name, config_cls, factory, *, _kind=kind, _label=label, _version=version):
                    _check_registration(_kind, _label, name, config_cls, factory)
                    doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
                    reg.add(Entry(_kind, name, config_cls, factory, _label, _version, doc[0] if doc else ""))

                # Call this one plugin's hook through pluggy (so DIS_TRACE_HOOKS sees it), with a
                # `register` that knows which plugin is registering.
                others = [p for p in pm.get_plugins() if p is not impl.plugin]
                pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
        return reg


def _check_registration(kind: str, plugin: str, name: Any, config_cls: Any, factory: Any) -> None:
    where = f"plugin {plugin!r} registering {kind} {name!r}"
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise PluginError(f"{where}: the name must be a non-empty identifier-like string")
    if not (isinstance(config_cls, type) and attrs.has(config_cls)):
        raise PluginError(f"{where}: config_cls must be an attrs class (use @attrs.frozen(kw_only=True))")
    if not callable(factory):
        raise PluginError(f"{where}: factory must be callable as factory(config, ctx)")
