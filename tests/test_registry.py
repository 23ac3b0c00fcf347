"""Registry and plugin-manager behaviour: registration checks, duplicates, strictness."""

from __future__ import annotations

import attrs
import pytest

from dis_core import hookimpl
from dis_core.errors import DuplicateComponentError, PluginError, UnknownComponentError
from dis_core.plugins import load_registry, make_plugin_manager
from dis_core.registry import KINDS, Registry


@attrs.frozen(kw_only=True)
class _Cfg:
    width: int = 3


class _TargetsPlugin:
    @hookimpl
    def register_target_generators(self, register):
        register("echo", _Cfg, lambda config, ctx: ("echo", config.width))


def test_inline_plugin_registers_and_builds():
    reg = load_registry(extra_plugins=(_TargetsPlugin(),), load_entry_points=False)
    entry = reg.get("target_generator", "echo")
    assert entry.config_cls is _Cfg
    assert entry.factory(_Cfg(width=5), None) == ("echo", 5)
    assert "_TargetsPlugin" in entry.plugin or entry.plugin  # label of the providing plugin


def test_duplicate_name_names_both_plugins():
    class Other:
        @hookimpl
        def register_target_generators(self, register):
            register("reveal_path", _Cfg, lambda c, x: None)

    with pytest.raises(DuplicateComponentError) as info:
        load_registry(extra_plugins=(Other(),))
    msg = str(info.value)
    assert "reveal_path" in msg and "targets" in msg  # the builtin module's plugin name
    assert msg.count("plugin") >= 2


def test_misspelled_hook_fails_at_startup():
    class Typo:
        @hookimpl
        def register_target_generator(self, register):  # missing the final "s"
            pass

    with pytest.raises(PluginError, match="register_target_generator"):
        make_plugin_manager(load_entry_points=False, extra_plugins=(Typo(),))


def test_registration_is_checked():
    class BadConfig:
        @hookimpl
        def register_tasks(self, register):
            register("bad", dict, lambda c, x: None)

    with pytest.raises(PluginError, match="attrs class"):
        load_registry(extra_plugins=(BadConfig(),), load_entry_points=False)


def test_unknown_name_lists_available_and_how_to_see_more():
    reg = load_registry()
    with pytest.raises(UnknownComponentError) as info:
        reg.get("backbone", "trn")
    msg = str(info.value)
    assert "trm" in msg and "dis plugins" in msg


def test_builtins_cover_every_kind():
    reg = load_registry()
    kinds = {e.kind for e in reg.entries()}
    assert kinds == set(KINDS.values())
    for kind, name in [("task", "nqueens"), ("backbone", "trm"), ("target_generator", "reveal_path"),
                       ("halting", "fixed"), ("evaluator", "exact"), ("optimizer", "adamw")]:
        assert (kind, name) in reg


def test_each_manager_is_fresh():
    a, b = make_plugin_manager(), make_plugin_manager()
    assert a is not b
    extra = _TargetsPlugin()
    a.register(extra)
    assert ("target_generator", "echo") in Registry.collect(a)
    assert ("target_generator", "echo") not in Registry.collect(b)


def test_hook_with_wrong_argument_name_is_a_plugin_error():
    class WrongArg:
        @hookimpl
        def register_tasks(self, reg):  # pluggy matches arguments by name: must be `register`
            pass

    with pytest.raises(PluginError, match="reg"):
        make_plugin_manager(load_entry_points=False, extra_plugins=(WrongArg(),))


def test_trace_hooks_goes_to_stderr(monkeypatch, capsys):
    monkeypatch.setenv("DIS_TRACE_HOOKS", "1")
    load_registry(extra_plugins=(_TargetsPlugin(),), load_entry_points=False)
    captured = capsys.readouterr()
    assert "register_target_generators" in captured.err and captured.out == ""
