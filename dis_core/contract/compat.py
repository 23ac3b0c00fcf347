"""The plugin contract's version, and what a plugin written against an older version gets.

`CONTRACT_VERSION` is MAJOR.MINOR (docs/hooks.md, "Contract versions"). A minor version only
adds: a component kind, an optional Protocol, a `BuildContext` field with a default, or a member
of a Protocol that a plugin written against an earlier minor version lacks, so that member comes
with a default (a row of `ADDITIONS`). A row either stays optional (the default is as good as
declaring it) or is deprecated: a plugin without the member gets a `DisContractWarning` naming
what to add, and the major version in `required_from` may require it. Only a major version
removes or requires anything.

Core code reads such members through the functions below (`headline_of(evaluator)`), never
directly, so that a plugin written against 1.0 keeps working. `conformance` is what the
registry (`check_built`) and `dis_core.testing` check a built component with; `static_notes`
reads a factory's return annotation, so that `dis plugins` can warn without building anything.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Any

import attrs

from dis_core.contract.errors import DisContractWarning

CONTRACT_VERSION = "1.5"
"""The plugin contract dis implements: MAJOR.MINOR; see CHANGELOG.md for each version's changes."""

_UNSET = object()


@attrs.frozen
class Addition:
    """A Protocol member added after contract 1.0, and what a plugin without it gets."""

    kind: str  # registry kind of the Protocol ("evaluator")
    member: str  # attribute or method name
    since: str  # contract version that added it
    default: Any  # what the core uses when the component lacks it
    meaning: str  # what the default means, in a sentence
    required_from: str | None = None  # major version that will require it (deprecated); None = stays optional
    advice: str = ""  # what to add, for the warning
    needed_when: str = ""  # a boolean member that, when true, makes this one required after all

    @property
    def deprecated(self) -> bool:
        return self.required_from is not None


ADDITIONS: tuple[Addition, ...] = (
    Addition(
        "evaluator", "headline", "1.1", None, required_from="2.0",
        meaning="no headline: run.json's headline_metrics leaves the evaluator out, and `dis compare` falls back "
                "to a */valid_solution_rate or */exact_accuracy metric",
        advice='add a class attribute `headline = "<metric>"` naming the metric (without the evaluator prefix) that '
               'says how well the task is solved, e.g. "valid_solution_rate"',
    ),
    Addition(
        "halting", "uses_continue_loss", "1.1", False,
        meaning="no Q-continue loss (as in 1.0): `continue_loss` is never called, and need not exist",
    ),
    Addition(
        "halting", "continue_loss", "1.1", None, needed_when="uses_continue_loss",
        meaning="only called when `uses_continue_loss` is True",
    ),
    Addition(
        "backbone", "puzzle_emb_ndim", "1.1", 0,
        meaning="no per-puzzle embedding (as in 1.0, where the attribute was optional)",
    ),
)

_ROWS = {(a.kind, a.member): a for a in ADDITIONS}


def version_tuple(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    return int(major), int(minor or 0)


# ------------------------------------------------------------------------------ defaults


def member(obj: Any, kind: str, name: str) -> Any:
    """`obj.<name>`, or the default of its `ADDITIONS` row when a plugin written against an
    older contract lacks it."""
    return getattr(obj, name, _ROWS[(kind, name)].default)


def headline_of(evaluator: Any) -> str | None:
    """The evaluator's headline metric (without its prefix), or None for one written before
    contract 1.1: leave it out of run.json's headline_metrics and of the console's guidance rows."""
    return member(evaluator, "evaluator", "headline") or None


def uses_continue_loss(halting: Any) -> bool:
    """Whether the strategy adds HRM's Q-continue loss (False for one written before 1.1)."""
    return bool(member(halting, "halting", "uses_continue_loss"))


def puzzle_emb_ndim_of(backbone: Any) -> int:
    """Width of the per-puzzle embedding the backbone takes; 0 = none (the default)."""
    return int(member(backbone, "backbone", "puzzle_emb_ndim"))


# ------------------------------------------------------------------------------ checking


def protocol_members(proto: type) -> tuple[set[str], set[str]]:
    """(methods, data attributes) a runtime-checkable Protocol declares, inherited ones too."""
    methods, data = set(), set()
    for klass in proto.__mro__:
        if klass is object or klass.__module__ == "typing":
            continue
        methods |= {n for n, v in vars(klass).items() if callable(v) and (not n.startswith("_") or n == "__call__")}
        data |= set(vars(klass).get("__annotations__", {}))
    return methods, data


def conformance(obj: Any, kind: str, proto: type) -> tuple[list[str], list[Addition]]:
    """(what `obj` lacks of `proto` that has no default, as "attribute x" / "x", the deprecated
    `ADDITIONS` rows it lacks). A member with a default is never missing; an optional one
    (`uses_continue_loss`) is not reported at all."""
    methods, data = protocol_members(proto)
    missing, outdated = [], []
    for name in sorted(methods | data):
        present = callable(getattr(obj, name, None)) if name in methods else hasattr(obj, name)
        if present:
            continue
        row = _ROWS.get((kind, name))
        if row is None:
            missing.append(name if name in methods else f"attribute {name}")
        elif row.needed_when and member(obj, kind, row.needed_when):
            missing.append(f"{name} (required since {row.needed_when} is True)")
        elif row.deprecated:
            outdated.append(row)
    return missing, outdated


def message(row: Addition, who: str) -> str:
    """The warning for component `who` ("evaluator 'parity' of plugin 'parity' (ParityEvaluator)")."""
    return (f"{who} has no `{row.member}`, which plugin contract {row.since} added and {row.required_from} will "
            f"require (dis implements {CONTRACT_VERSION}): {row.advice}. Until then dis uses the default: {row.meaning} "
            f"(docs/hooks.md, \"Contract versions\")")


# Passed to warn_explicit as the once-per-message registry; the warnings module clears it when
# the filters change (pytest.warns, catch_warnings), so a later check warns again.
_ONCE: dict = {}


def warn(row: Addition, who: str, where: Any = None) -> None:
    """Issue the `DisContractWarning` for `row`, attributed to the plugin's source: the class
    (or function) `where` when its file is known, so the warning names the plugin's line."""
    try:
        filename = inspect.getsourcefile(where) or ""
        lineno = inspect.getsourcelines(where)[1]
    except (TypeError, OSError):
        filename, lineno = "dis_core/contract/compat.py", 0
    warnings.warn_explicit(message(row, who), DisContractWarning, filename, lineno, registry=_ONCE)


def describe(kind: str, name: str, plugin: str, cls: type | None) -> str:
    owner = f" ({cls.__qualname__})" if cls is not None else ""
    return f"{kind} {name!r} of plugin {plugin!r}{owner}"


# Components already reported: `dis check` builds a component (the registry warns) and then runs
# dis_core.testing's checks on it, which would warn again. The warnings module's own
# once-per-place memory does not hold here: every filter change (numpy, torch and DeepSpeed make
# some while loading) clears it.
_REPORTED: weakref.WeakSet = weakref.WeakSet()


def check_and_warn(obj: Any, kind: str, proto: type, who: str, *, reported: bool = False) -> list[str]:
    """What `obj` lacks (as `conformance`), after warning about each deprecated member it lacks,
    unless `obj` was reported already (`reported`: its registry warned, without building it)."""
    missing, outdated = conformance(obj, kind, proto)
    if outdated and not missing:
        try:
            reported = reported or obj in _REPORTED
            _REPORTED.add(obj)
        except TypeError:  # neither hashable nor weakly referable: warn each time
            pass
        if not reported:
            for row in outdated:
                warn(row, who, type(obj))
    return missing


# ------------------------------------------------------------------------------ without building


def returned_class(factory: Any) -> type | None:
    """The class a factory's return annotation names, when it names a concrete class."""
    hint = getattr(factory, "__annotations__", {}).get("return")
    if isinstance(hint, str):  # `from __future__ import annotations`
        try:
            hint = eval(hint, getattr(factory, "__globals__", {}))  # noqa: S307 (the plugin's own annotation)
        except Exception:
            return None
    if not isinstance(hint, type) or getattr(hint, "_is_protocol", False) or hint.__module__ == "typing":
        return None
    return hint


def _declares(cls: type, name: str) -> bool:
    """Whether instances of `cls` have `name`: a class attribute or method, an attrs field, an
    annotation, or an attribute some method of the class assigns (`self.q_head = ...`)."""
    if hasattr(cls, name) or (attrs.has(cls) and name in attrs.fields_dict(cls)):
        return True
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return True
        for value in vars(klass).values():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None and name in code.co_names:
                return True
    return False


def static_notes(kind: str, name: str, plugin: str, factory: Any, proto: Any) -> list[tuple[Addition, str, type]]:
    """(row, who, class) for each deprecated member the class that `factory` is annotated to
    return lacks. Empty when the factory has no such annotation: the build-time check covers it.
    A factory annotated with a base class whose subclasses add the member is reported wrongly;
    annotating the class it returns avoids that."""
    cls = returned_class(factory)
    if cls is None or not isinstance(proto, type):
        return []
    methods, data = protocol_members(proto)
    who = describe(kind, name, plugin, cls)
    return [(row, who, cls) for row in ADDITIONS
            if row.kind == kind and row.deprecated and row.member in methods | data and not _declares(cls, row.member)]
