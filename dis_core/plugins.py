"""Building the plugin manager: a function, not an import-time global, so each test gets its own."""

from __future__ import annotations

import importlib.metadata as md
import os
import sys

import pluggy

from dis_core import hookspecs
from dis_core.errors import PluginError

ENTRY_POINT_GROUP = "dis"


def make_plugin_manager(*, load_entry_points: bool = True, extra_plugins: tuple = ()) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs, every `dis` entry point, and `extra_plugins`.

    `check_pending()` turns a misspelled `@hookimpl` (a hook name that no spec defines) into a
    start-up error instead of a silently ignored function.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {pm.get_name(exc.plugin) or exc.plugin!r} is broken: {exc}") from exc
        except (ImportError, AttributeError) as exc:
            raise PluginError(f"a plugin in entry-point group {ENTRY_POINT_GROUP!r} failed to load: {exc}") from exc
    try:
        for plugin in extra_plugins:
            pm.register(plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        # e.g. a misspelled hook name, or a hook whose argument is not called `register`
        raise PluginError(f"plugin {pm.get_name(exc.plugin) or exc.plugin!r} is broken: {exc}") from exc
    if os.environ.get("DIS_TRACE_HOOKS"):
        pm.trace.root.setwriter(sys.stderr.write)  # stderr: keeps --json output clean
        pm.enable_tracing()
    return pm


def plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    name = pm.get_name(plugin)
    return name or getattr(plugin, "__name__", repr(plugin))


def plugin_version(pm: pluggy.PluginManager, plugin: object) -> str | None:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return dist.version
    return None


def load_registry(*, extra_plugins: tuple = (), load_entry_points: bool = True):
    from dis_core.registry import Registry

    return Registry.collect(make_plugin_manager(load_entry_points=load_entry_points, extra_plugins=extra_plugins))


def installed_versions() -> dict[str, str]:
    """Versions of the packages a run depends on, saved beside every run."""
    out = {}
    for pkg in ("dis", "torch", "deepspeed", "numpy", "pluggy", "attrs", "cattrs", "structlog"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
