"""Registry and plugin-manager behaviour: registration checks, duplicates, strictness."""

from __future__ import annotations

import attrs
import pytest

from dis_core import hookimpl
from dis_core.contract.errors import DuplicateComponentError, PluginError, UnknownComponentError
from dis_core.contract.interfaces import Evaluator
from dis_core.wiring.plugins import load_registry, make_plugin_manager
from dis_core.wiring.registry import KINDS, Registry


@attrs.frozen(kw_only=True)
class _Cfg:
    width: int = 3


class _TargetsPlugin:
    @hookimpl
    def register_target_generators(self, register):
        register("echo", _Cfg, lambda config, ctx: ("echo", config.width))


def test_inline_plugin_registers_and_builds():
    plugin = _TargetsPlugin()
    plugin.__name__ = "echo_targets"  # an object plugin's label, as pluggy names it
    reg = load_registry(extra_plugins=(plugin,), load_entry_points=False)
    entry = reg.get("target_generator", "echo")
    assert (entry.kind, entry.config_cls, entry.plugin) == ("target_generator", _Cfg, "echo_targets")
    assert entry.factory(_Cfg(width=5), None) == ("echo", 5)


def test_duplicate_name_names_both_plugins():
    class Other:
        __name__ = "other_targets"

        @hookimpl
        def register_target_generators(self, register):
            register("reveal_path", _Cfg, lambda c, x: None)

    with pytest.raises(DuplicateComponentError) as info:
        load_registry(extra_plugins=(Other(),))
    # the builtin entry point `targets` first, then the plugin added after it
    assert str(info.value) == ("target_generator 'reveal_path' is registered twice: by plugin 'targets' "
                               "and by plugin 'other_targets'")


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
                       ("halting", "fixed"), ("evaluator", "exact"), ("optimizer", "adamw"), ("logger", "tensorboard")]:
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


# ------------------------------------------------------------------ contract versions (dis_core.contract.compat)


class _Cells:
    """An evaluator of contract 1.0 (no headline)."""

    def reset(self): ...

    def update(self, record): ...

    def state(self): ...

    def compute(self, states, out_dir):
        return {}


def test_a_missing_deprecated_member_warns_and_a_missing_required_one_fails():
    import warnings

    from dis_core.contract.errors import DisContractWarning
    from dis_core.wiring.registry import Entry, check_built

    entry = Entry("evaluator", "cells", _Cfg, lambda c, x: None, "cells_plugin")
    with pytest.warns(DisContractWarning, match=r"evaluator 'cells' of plugin 'cells_plugin' \(_Cells\) has no `headline`"):
        assert isinstance(check_built(entry, _Cells(), "$.evaluators[0]"), _Cells)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_built(entry, _Cells(), "$.evaluators[0]", reported=True)  # the registry said so when loading
    del _Cells.update  # a 1.0 member: no default, so still a PluginError naming it
    try:
        with pytest.raises(PluginError, match=r"not a evaluator \(missing: update\)"):
            check_built(entry, _Cells(), "$.evaluators[0]")
    finally:
        _Cells.update = lambda self, record: None


def test_optional_additions_have_their_defaults_and_a_declared_q_continue_needs_its_method():
    from dis_core.contract import compat
    from dis_core.wiring.registry import Entry, check_built

    class Halting10:  # contract 1.0: no uses_continue_loss, no continue_loss
        max_steps, uses_q_head = 2, False

        def halt(self, steps, q_logits, *, training, generator): ...

        def loss(self, q_logits, seq_correct): ...

    class Backbone10:  # contract 1.0: no puzzle_emb_ndim
        hidden_size, prefix_len = 8, 0

        def initial_state(self, batch_size): ...

        def forward(self, state, tokens, step, puzzle_emb=None): ...

        def calls_per_step(self): ...

        def flops_per_call(self, seq_len): ...

    entry = Entry("halting", "h", _Cfg, lambda c, x: None, "p")
    h = check_built(entry, Halting10(), "$.halting")
    assert compat.uses_continue_loss(h) is False
    h.uses_continue_loss = True  # declares Q-continue, but has no continue_loss
    with pytest.raises(PluginError, match=r"missing: continue_loss \(required since uses_continue_loss is True\)"):
        check_built(entry, h, "$.halting")
    b = check_built(Entry("backbone", "b", _Cfg, lambda c, x: None, "p"), Backbone10(), "$.backbone")
    assert compat.puzzle_emb_ndim_of(b) == 0


class _SetInInit(_Cells):
    def __init__(self):
        self.headline = "accuracy"  # an instance attribute counts


@attrs.frozen
class _AttrsField(_Cells):
    headline: str = "accuracy"


def test_the_static_check_reads_a_factorys_return_annotation():
    # The annotations are strings (`from __future__ import annotations`), read in this module's
    # globals: the classes above are module-level for that reason.
    from dis_core.contract import compat

    def notes(factory):
        return [row.member for row, _, _ in compat.static_notes("evaluator", "e", "p", factory, Evaluator)]

    def old() -> _Cells: ...

    def set_in_init() -> _SetInInit: ...

    def attrs_field() -> _AttrsField: ...

    def protocol() -> Evaluator: ...  # says nothing about the class: left to the build-time check

    assert compat.returned_class(set_in_init) is _SetInInit and compat.returned_class(attrs_field) is _AttrsField
    assert notes(old) == ["headline"]
    assert notes(set_in_init) == notes(attrs_field) == notes(protocol) == notes(lambda c, x: _Cells()) == []
