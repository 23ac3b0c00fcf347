"""Building the plugin manager: a function, not an import-time global, so each test gets its own.

Plugins come from the `dis` entry-point group (installed packages) and from `extra_plugins`:
objects registered in code (tests), or modules named on the command line with `--plugin`
(`load_plugin_modules`).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Iterable

import attrs
import pluggy
import structlog

from dis_core.contract import compat, hookspecs
from dis_core.contract.errors import DisError, PluginError, UserError
from dis_core.wiring.registry import COMMAND_LINE, Registry
from dis_core.contract.slots import SLOTS, Slot

ENTRY_POINT_GROUP = "dis"
log = structlog.get_logger()


@attrs.frozen
class BrokenPlugin:
    """An installed plugin that failed to load or register; the others are used without it."""

    name: str  # the entry point's name, which is the plugin's name
    entry_point: str  # "name = module:attr"
    distribution: str  # "package version", or "unknown distribution"
    version: str | None
    error: str  # "ModuleNotFoundError: No module named 'x' (at file.py:3)"

    def describe(self) -> str:
        return f"plugin {self.name!r} (entry point `{self.entry_point}` of distribution {self.distribution})"


class DisPluginManager(pluggy.PluginManager):
    """pluggy's manager, plus the entry-point plugins that are installed but broken."""

    def __init__(self, project_name: str):
        super().__init__(project_name)
        self.broken: list[BrokenPlugin] = []
        self.entry_point_names: set[str] = set()

    def mark_broken(self, name: str, exc: BaseException) -> None:
        """Record plugin `name` as broken and unregister whatever of it was registered."""
        ep, dist = _find_entry_point(name)
        self.broken.append(BrokenPlugin(
            name=name,
            entry_point=f"{name} = {ep.value}" if ep else name,
            distribution=f"{dist.metadata['Name']} {dist.version}" if dist else "unknown distribution",
            version=dist.version if dist else None,
            error=_describe(exc),
        ))
        self.set_blocked(name)


def _find_entry_point(name: str):
    for dist in md.distributions():
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP and ep.name == name:
                return ep, dist
    return None, None


def _describe(exc: BaseException) -> str:
    """The exception and the innermost frame it came from (a plugin's file and line)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and not isinstance(exc, pluggy.PluginValidationError):
        last = frames[-1]
        text += f" (at {last.filename}:{last.lineno})"
    return text


def _load_entry_points(pm: DisPluginManager) -> None:
    """Every plugin of the `dis` entry-point group; one that fails to import or to validate is
    recorded as broken (with its entry point and distribution) and the rest load without it."""
    for dist in list(md.distributions()):
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            pm.entry_point_names.add(ep.name)
            try:
                ep.load()  # imports the module: any exception at all is the plugin's
            except Exception as exc:
                pm.mark_broken(ep.name, exc)
    # Register through pluggy (which records the distributions); blocked names are skipped.
    for _ in range(len(pm.entry_point_names) + 1):
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            break
        except pluggy.PluginValidationError as exc:  # e.g. a hook whose argument is not `register`
            pm.mark_broken(pm.get_name(exc.plugin) or str(exc.plugin), exc)
        except ValueError as exc:  # one module under two entry-point names
            raise PluginError(f"entry-point group {ENTRY_POINT_GROUP!r}: {exc}") from exc
    for name in sorted(pm.entry_point_names):
        plugin = pm.get_plugin(name)
        if plugin is not None and not pm.get_hookcallers(plugin):
            ep, dist = _find_entry_point(name)
            log.warning("plugin registers nothing: it defines no @hookimpl function (import the marker with "
                        "`from dis_core import hookimpl`)", plugin=name, entry_point=f"{name} = {ep.value}" if ep else name,
                        module=getattr(plugin, "__file__", None) or repr(plugin))


def make_plugin_manager(*, load_entry_points: bool = True, extra_plugins: tuple = (),
                        slots: tuple[Slot, ...] = SLOTS) -> DisPluginManager:
    """A plugin manager with one hookspec per slot, every `dis` entry point, and `extra_plugins`.

    `check_pending()` turns a misspelled `@hookimpl` (a hook name that no spec defines) into a
    start-up error instead of a silently ignored function: for `extra_plugins` an exception, for
    an installed plugin an entry in `pm.broken` (the other plugins stay usable). An installed
    plugin that defines no `@hookimpl` at all is a warning naming it.
    """
    pm = DisPluginManager(hookspecs.PROJECT)
    pm.slots = tuple(slots)
    pm.add_hookspecs(hookspecs.specs_for(pm.slots))
    if load_entry_points:
        _load_entry_points(pm)
    try:
        for plugin in extra_plugins:
            try:
                pm.register(plugin)
            except ValueError as exc:  # a --plugin module named like an installed plugin
                raise PluginError(f"plugin {pm.get_canonical_name(plugin)!r} cannot be added: {exc}") from exc
        for _ in range(len(pm.entry_point_names) + 1):
            try:
                pm.check_pending()
                break
            except pluggy.PluginValidationError as exc:
                name = pm.get_name(exc.plugin)
                if name not in pm.entry_point_names:
                    raise
                pm.mark_broken(name, exc)
    except pluggy.PluginValidationError as exc:
        # e.g. a misspelled hook name, or a hook whose argument is not called `register`
        raise PluginError(f"plugin {pm.get_name(exc.plugin) or exc.plugin!r} is broken: {exc}") from exc
    if os.environ.get("DIS_TRACE_HOOKS"):
        pm.trace.root.setwriter(sys.stderr.write)  # stderr: keeps --json output clean
        pm.enable_tracing()
    return pm



def load_registry(*, extra_plugins: tuple = (), load_entry_points: bool = True, slots: tuple[Slot, ...] = SLOTS):
    """Every plugin's registration hooks called into a fresh registry. A `--plugin` module whose
    hook raises is a `PluginError` naming the flag, the file, the hook and the exception (it was
    asked for by name, so it is not skipped as an installed plugin would be)."""
    pm = make_plugin_manager(load_entry_points=load_entry_points, extra_plugins=extra_plugins, slots=slots)
    failed: list[tuple[object, str]] = []  # (--plugin module, hook) of the hook calls that raised

    def after(outcome, hook_name, impls, _kwargs):
        if outcome.exception is not None:  # Registry.collect calls one plugin's hook at a time
            failed.extend((impl.plugin, hook_name) for impl in impls if getattr(impl.plugin, COMMAND_LINE, None) is not None)

    undo = pm.add_hookcall_monitoring(lambda *_: None, after)
    try:
        registry = Registry.collect(pm)
    except DisError:
        raise  # already names what is wrong (a bad registration, a duplicate name)
    except Exception as exc:
        if not failed:
            raise  # a plugin registered in code (tests): its traceback is the most useful report
        module, hook = failed[-1]
        raise PluginError(f"--plugin {getattr(module, COMMAND_LINE)}: its hook {hook} "
                          f"({getattr(module, '__file__', None) or module.__name__}) raised {_describe(exc)}") from exc
    finally:
        undo()
    warn_outdated(registry)
    return registry


def warn_outdated(registry: Registry) -> None:
    """A `DisContractWarning` for each component whose factory is annotated to return a class
    that lacks a deprecated member (an evaluator without `headline`): every command, `dis
    plugins` included, says what to add before anything is built. A factory without a return
    annotation is checked when its component is built (`registry.check_built`)."""
    for entry in registry.entries():
        notes = compat.static_notes(entry.kind, entry.name, entry.plugin, entry.factory, registry.slot(entry.kind).interface())
        for row, who, cls in notes:
            compat.warn(row, who, cls)
        if notes:
            registry.warned.add((entry.kind, entry.name))


def load_plugin_modules(values: Iterable[str]) -> tuple[ModuleType, ...]:
    """The modules that `--plugin VALUE` flags name, imported, for `load_registry(extra_plugins=...)`.

    A value is an importable module name (`my_package.plugin`) or the path of a `.py` file,
    loaded under its file name (like pytest's `-p`, for a plugin that is not packaged). Each
    module is marked, so the registry records it in run.json as loaded by `--plugin`. A module
    that cannot be imported, or that defines no `@hookimpl` function, is an error naming it."""
    modules = []
    for value in values:
        module = _import_plugin(value)
        marker = f"{hookspecs.PROJECT}_impl"
        if not any(hasattr(getattr(module, n, None), marker) for n in dir(module)):
            raise PluginError(
                f"--plugin {value}: module {module.__name__} ({getattr(module, '__file__', '?')}) defines no @hookimpl "
                f"function, so it would register nothing; mark its hooks with `from dis_core import hookimpl`"
            )
        setattr(module, COMMAND_LINE, value)
        modules.append(module)
    return tuple(modules)


def _import_plugin(value: str) -> ModuleType:
    if value.endswith(".py") or "/" in value or os.sep in value:
        path = Path(value).expanduser().absolute()
        if not path.is_file():
            raise UserError(f"--plugin {value}: no such file ({path})")
        name = path.stem
        if not name.isidentifier():
            raise UserError(f"--plugin {value}: the file name must be a Python identifier to be a module name")
        known = sys.modules.get(name)
        if known is not None:
            if getattr(known, "__file__", None) == str(path):
                return known  # loaded already (a second command in the same process)
            raise PluginError(f"--plugin {value}: a module named {name!r} is loaded already "
                              f"({getattr(known, '__file__', 'builtin')}); rename the file")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it, as `import` does (pickle and dataclasses look it up)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise PluginError(f"--plugin {value}: importing it failed: {_describe(exc)}") from exc
        return module
    try:
        return importlib.import_module(value)
    except ModuleNotFoundError as exc:
        if exc.name and (value == exc.name or value.startswith(exc.name + ".")):
            raise UserError(f"--plugin {value}: no module named {exc.name!r} (give an importable module name, "
                            f"or the path of a .py file)") from None
        raise PluginError(f"--plugin {value}: importing it failed: {_describe(exc)}") from exc
    except Exception as exc:
        raise PluginError(f"--plugin {value}: importing it failed: {_describe(exc)}") from exc


def installed_versions() -> dict[str, str]:
    """Versions of the packages a run depends on, saved beside every run."""
    out = {}
    for pkg in ("dis", "torch", "deepspeed", "numpy", "pluggy", "attrs", "cattrs", "structlog"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
