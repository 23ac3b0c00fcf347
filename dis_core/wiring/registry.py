"""A flat registry of components keyed by (kind, name).

Each entry holds the component's frozen attrs config class, its factory and the plugin that
provided it. Plugins never touch the dictionaries: they call the `register` callback that
`Registry.collect` hands to their hook, which checks what it is given. An installed plugin whose
hook fails is dropped whole and listed in `Registry.broken`, so the others stay usable; a name
nobody provides then says which plugins failed. The kinds, their hooks and their Protocols come
from the slot table (`dis_core.contract.slots`). `Registry.make` calls a factory and checks what it
returns; `Registry.build` (behind `BuildContext.build`) looks up and structures first.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from dis_core.contract import compat
from dis_core.wiring.config import structure
from dis_core.contract.errors import DisError, DuplicateComponentError, PluginError, RecipeError, UnknownComponentError, UserError
from dis_core.contract.slots import SLOTS, Slot, slot_of

# hook name -> component kind, in the order `dis plugins` lists them (the builtin slot table).
KINDS: dict[str, str] = {slot.hook: slot.kind for slot in SLOTS}


COMMAND_LINE = "__dis_plugin_flag__"  # set on a module loaded by --plugin: the flag's value


def plugin_label(pm, plugin: object) -> str:
    name = pm.get_name(plugin)
    if name and name != str(id(plugin)):  # pluggy names an unnamed plugin object by its id()
        return name
    return getattr(plugin, "__name__", None) or type(plugin).__name__


def plugin_version(pm, plugin: object) -> str | None:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return dist.version
    return None


@attrs.frozen
class Entry:
    kind: str
    name: str
    config_cls: type
    factory: Callable[..., Any]
    plugin: str
    version: str | None = None
    doc: str = ""
    loaded_by: str | None = None  # "--plugin" for a module given on the command line
    module_file: str | None = None  # that module's file

    def record(self) -> dict[str, Any]:
        """The entry as run.json's `plugins` list holds it."""
        row = {"kind": self.kind, "name": self.name, "plugin": self.plugin, "version": self.version}
        if self.loaded_by:
            row.update(loaded_by=self.loaded_by, module_file=self.module_file)
        return row


class Registry:
    def __init__(self, slots: tuple[Slot, ...] = SLOTS) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}
        self.broken: list = []  # plugins.BrokenPlugin: installed plugins that failed to load
        self.slots = tuple(slots)  # the component slots this registry was collected for
        # (kind, name) of the components that loading warned are written against an older
        # contract (plugins.warn_outdated): building one does not say so again.
        self.warned: set[tuple[str, str]] = set()

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
        order = [slot.kind for slot in self.slots]
        return sorted(self._entries.values(), key=lambda e: (order.index(e.kind), e.name))

    def slot(self, kind: str) -> Slot:
        return slot_of(kind, self.slots)

    def make(self, entry: Entry, config: Any, ctx) -> Any:
        """Call `entry`'s factory with its structured config; check that it returned its kind.

        A factory's ValueError, TypeError or FileNotFoundError (a bad combination its config
        class cannot see, a missing file) becomes a UserError naming the recipe and the path."""
        try:
            built = entry.factory(config, ctx)
        except DisError:
            raise
        except (ValueError, TypeError, FileNotFoundError) as exc:
            prefix = f"{ctx.source}: " if ctx.source else ""
            raise UserError(f"{prefix}cannot build {entry.kind} {entry.name!r} @ {ctx.component}: {exc}") from exc
        # the right kind of object, or a PluginError naming the plugin
        return check_built(entry, built, ctx.component, self.slot(entry.kind).interface(),
                           reported=(entry.kind, entry.name) in self.warned)

    def build(self, kind: str, name: str, config: dict | None, ctx, *, at: str = "", config_at: str | None = None) -> Any:
        """The component `name` of `kind`, built from a raw `config` table on behalf of the
        component `ctx` is building (what `BuildContext.build` does). `at` is where the name
        stands, relative to `ctx.component` ("config.fallback"), `config_at` where the table
        stands (default `<at>.config`); errors are reported there."""
        where = f"{ctx.component}.{at}" if at else ctx.component
        table_at = f"{ctx.component}.{config_at}" if config_at else f"{where}.config"
        try:
            entry = self.get(kind, name)
        except UnknownComponentError as exc:
            ctx.fail(str(exc), at=at)
        cfg, problems = structure(dict(config or {}), entry.config_cls, table_at)
        if problems:
            raise RecipeError(problems, source=ctx.source or None)
        return self.make(entry, cfg, attrs.evolve(ctx, component=where, config_path=table_at))

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    @classmethod
    def collect(cls, pm) -> "Registry":
        """Call every registration hook of the plugin manager and fill a fresh registry."""
        reg = cls(getattr(pm, "slots", SLOTS))
        reg.broken = list(getattr(pm, "broken", ()))
        installed = getattr(pm, "entry_point_names", set())
        for slot in reg.slots:
            hook_name, kind = slot.hook, slot.kind
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                label = plugin_label(pm, impl.plugin)
                version = plugin_version(pm, impl.plugin)
                if any(b.name == label for b in reg.broken):
                    continue  # failed in an earlier hook: dropped whole
                by_flag = getattr(impl.plugin, COMMAND_LINE, None) is not None
                origin = {"loaded_by": "--plugin", "module_file": getattr(impl.plugin, "__file__", None)} if by_flag else {}

                def register(name, config_cls, factory, *, _kind=kind, _label=label, _version=version, _origin=origin):
                    _check_registration(_kind, _label, name, config_cls, factory)
                    doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
                    reg.add(Entry(_kind, name, config_cls, factory, _label, _version, doc[0] if doc else "", **_origin))

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


# kind -> what a factory's result must satisfy: a Protocol, or a Callable type (the builtin table)
PROTOCOLS: dict[str, Any] = {slot.kind: slot.interface() for slot in SLOTS}


def check_built(entry: Entry, obj: Any, where: str, proto: Any = None, *, reported: bool = False) -> Any:
    """`obj` if it has every member of its kind's Protocol (interfaces.py) that has no default:
    the methods, and the attributes the core reads (`monotone`, `max_steps`, ...), or is callable
    where the kind is a Callable type (an optimizer's `make(params)`); else a `PluginError`
    naming the plugin, the component and what is missing. A member added after contract 1.0
    may be absent (`dis_core.contract.compat.ADDITIONS`): the core uses its default, and a deprecated one
    (an evaluator's `headline`) gets a `DisContractWarning` saying what to add, unless
    `reported` (the registry warned when it was loaded)."""
    proto = PROTOCOLS.get(entry.kind) if proto is None else proto
    if proto is None:
        return obj
    if not isinstance(proto, type):  # typing.Callable[[...], R]
        if callable(obj):
            return obj
        missing = [f"callable as {proto}"]
    elif isinstance(obj, type):
        missing = []
    else:
        missing = compat.check_and_warn(obj, entry.kind, proto, compat.describe(entry.kind, entry.name, entry.plugin, type(obj)),
                                        reported=reported)
        if not missing:
            return obj
    got = f"the class {obj.__qualname__} (not an instance of it)" if isinstance(obj, type) else (
        f"{type(obj).__module__}.{type(obj).__qualname__}" if obj is not None else "None")
    raise PluginError(
        f"plugin {entry.plugin!r}: the factory of {entry.kind} {entry.name!r} @ {where} returned {got}, "
        f"which is not a {entry.kind} (missing: {', '.join(missing) or '-'}); see the {entry.kind} section "
        f"of docs/hooks.md for what the factory must return"
    )


def contract_notes(registry: Registry) -> list[tuple[Entry, str]]:
    """(entry, warning) for each deprecated member that an entry's factory, by its return
    annotation, lacks: what `dis plugins` and `load_registry` report without building anything."""
    return [(entry, compat.message(row, who)) for entry in registry.entries()
            for row, who, _ in compat.static_notes(entry.kind, entry.name, entry.plugin, entry.factory,
                                                   registry.slot(entry.kind).interface())]
