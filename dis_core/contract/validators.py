"""attrs validators for component configs, with messages that name the field and the value.

    from dis_core.contract.validators import non_negative, positive, probability

    @attrs.frozen(kw_only=True)
    class MyConfig:
        steps: int = attrs.field(default=6, validator=positive)
        rate: float = attrs.field(default=0.1, validator=probability)
        schedule: Literal["linear", "cosine"] = attrs.field(default="linear", validator=one_of("linear", "cosine"))

A recipe turns a failed check into `invalid value (rate must lie in [0, 1], got 1.5) @ $.path`,
and reports every field that fails, not only the first. For a choice among strings annotate the
field with `typing.Literal`: the recipe loader then lists the choices itself; add `one_of` only if
the class is also built directly in Python (attrs does not check annotations). Prefer these to
`attrs.validators.in_`, whose message prints the whole Attribute object. `None` passes every
validator here, so an optional field (`int | None`) needs no wrapper.

TOML has `nan` and `inf`, and no numeric check here lets either through: every comparison with
NaN is false, so `x > 0` alone would accept it. A field where infinity would mean "no limit" is
better an optional one, `None` for no limit. `finite` is the check for a float with no range.
"""

from __future__ import annotations

import math
from typing import Any, Callable

Validator = Callable[[Any, Any, Any], None]


def _items(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _check_finite(attr, value) -> None:
    bad = [v for v in _items(value) if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        each = " each" if isinstance(value, (tuple, list)) else ""
        raise ValueError(f"{attr.name} must{each} be a finite number, got {value}")


def finite(_inst, attr, value) -> None:
    """Not NaN, not infinite (on a tuple, every element)."""
    if value is not None:
        _check_finite(attr, value)


def positive(_inst, attr, value) -> None:
    """value > 0, finite."""
    if value is None:
        return
    _check_finite(attr, value)
    if value <= 0:
        raise ValueError(f"{attr.name} must be > 0, got {value}")


def non_negative(_inst, attr, value) -> None:
    """value >= 0, finite."""
    if value is None:
        return
    _check_finite(attr, value)
    if value < 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value}")


def probability(_inst, attr, value) -> None:
    """0 <= value <= 1 (NaN fails)."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{attr.name} must lie in [0, 1], got {value}")


def in_range(low: float, high: float, *, high_open: bool = False) -> Validator:
    """low <= value <= high (or < high with high_open); on a tuple, every element (NaN fails)."""
    bracket = ")" if high_open else "]"
    shown = [f"{b:g}" if isinstance(b, float) else str(b) for b in (low, high)]

    def check(_inst, attr, value) -> None:
        if value is None:
            return
        items = _items(value)
        if not all(low <= v < high if high_open else low <= v <= high for v in items):
            each = " each" if isinstance(value, (tuple, list)) else ""
            raise ValueError(f"{attr.name} must{each} lie in [{shown[0]}, {shown[1]}{bracket}, got {value}")

    return check


def one_of(*choices: Any) -> Validator:
    """value is one of `choices` (the runtime twin of a `Literal[...]` annotation)."""
    listed = ", ".join(repr(c) for c in choices)

    def check(_inst, attr, value) -> None:
        if value is not None and value not in choices:
            raise ValueError(f"{attr.name} must be one of {listed}, got {value!r}")

    return check
