"""A flat registry of components keyed by (kind, name).

Each entry holds the component's frozen attrs config class, its factory and the plugin that
provided it. Plugins never touch the dictionaries: they call the `register` callback that
`Registry.collect` hands to their hook, which checks what it is given. An installed plugin whose
hook fails is dropped whole and listed in `Registry.broken`, so the others stay usable; a name
nobody provides then says which plugins failed. `check_built` checks what a factory returns.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from dis_core import interfaces
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
        self.broken: list = []  # plugins.BrokenPlugin: installed plugins that failed to load

    def add(self, entry: Entry) -> None:
        key = (entry.kind, entry.name)
        if key in self._entries:
            raise DuplicateComponentError(entry.kind, entry.name, self._entries[key].plugin, entry.plugin)
        self._entries[key] = entry

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self._entries[(kind, name)]
        except KeyError:
            raise UnknownComponentError(kind, name, self.names(kind), broken=[_broken_line(b) for b in self.broken]) from None

    def remove_plugin(self, plugin: str) -> None:
        for key in [k for k, e in self._entries.items() if e.plugin == plugin]:
            del self._entries[key]

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
        reg.broken = list(getattr(pm, "broken", ()))
        installed = getattr(pm, "entry_point_names", set())
        for hook_name, kind in KINDS.items():
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                label = plugin_label(pm, impl.plugin)
                version = plugin_version(pm, impl.plugin)
                if any(b.name == label for b in reg.broken):
                    continue  # failed in an earlier hook: dropped whole

                def register(name, config_cls, factory, *, _kind=kind, _label=label, _version=version):
                    _check_registration(_kind, _label, name, config_cls, factory)
                    doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
                    reg.add(Entry(_kind, name, config_cls, factory, _label, _version, doc[0] if doc else ""))

                # Call this one plugin's hook through pluggy (so DIS_TRACE_HOOKS sees it), with a
                # `register` that knows which plugin is registering.
                others = [p for p in pm.get_plugins() if p is not impl.plugin]
                try:
                    pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
                except DuplicateComponentError:
                    raise  # never silently pick one of two providers
                except Exception as exc:
                    if label not in installed:
                        raise  # a plugin registered in code (tests): fail loudly
                    reg.remove_plugin(label)
                    pm.mark_broken(label, exc)
                    reg.broken = list(pm.broken)
        return reg


def _check_registration(kind: str, plugin: str, name: Any, config_cls: Any, factory: Any) -> None:
    where = f"plugin {plugin!r} registering {kind} {name!r}"
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise PluginError(f"{where}: the name must be a non-empty identifier-like string")
    if not (isinstance(config_cls, type) and attrs.has(config_cls)):
        raise PluginError(f"{where}: config_cls must be an attrs class (use @attrs.frozen(kw_only=True))")
    if not callable(factory):
        raise PluginError(f"{where}: factory must be callable as factory(config, ctx)")


def _broken_line(b) -> str:
    return f"{b.describe()} failed to load ({b.error}) and may be the one that provides it"


# kind -> the Protocol (runtime-checkable) a factory's result must satisfy
PROTOCOLS: dict[str, type] = {
    "task": interfaces.Task,
    "backbone": interfaces.Backbone,
    "target_generator": interfaces.TargetGenerator,
    "halting": interfaces.HaltingStrategy,
    "evaluator": interfaces.Evaluator,
}


def check_built(entry: Entry, obj: Any, where: str) -> Any:
    """`obj` if it has every member of its kind's Protocol (interfaces.py): the methods, and the
    attributes the core reads (`monotone`, `headline`, `puzzle_emb_ndim`, ...); else a
    `PluginError` naming the plugin, the component and what is missing."""
    if entry.kind == "optimizer":
        if callable(obj):
            return obj
        missing = ["a callable make_optimizer(params)"]
    else:
        proto = PROTOCOLS.get(entry.kind)
        if proto is None:
            return obj
        methods, data = _protocol_members(proto)
        missing = [m for m in sorted(methods) if not callable(getattr(obj, m, None))]
        missing += [f"attribute {a}" for a in sorted(data) if not hasattr(obj, a)]
        if not missing and not isinstance(obj, type):
            return obj
    got = f"the class {obj.__qualname__} (not an instance of it)" if isinstance(obj, type) else (
        f"{type(obj).__module__}.{type(obj).__qualname__}" if obj is not None else "None")
    raise PluginError(
        f"plugin {entry.plugin!r}: the factory of {entry.kind} {entry.name!r} @ {where} returned {got}, "
        f"which is not a {entry.kind} (missing: {', '.join(missing) or '-'}); see the {entry.kind} section "
        f"of docs/hooks.md for what the factory must return"
    )


def _protocol_members(proto: type) -> tuple[set[str], set[str]]:
    """(methods, data attributes) a runtime-checkable Protocol declares, inherited ones too."""
    methods, data = set(), set()
    for klass in proto.__mro__:
        if klass is object or klass.__module__ == "typing":
            continue
        methods |= {n for n, v in vars(klass).items() if callable(v) and (not n.startswith("_") or n == "__call__")}
        data |= set(vars(klass).get("__annotations__", {}))
    return methods, data
