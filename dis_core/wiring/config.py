"""The one strict cattrs converter, and path-addressed error messages.

cattrs by default coerces ("3" -> 3, 3.7 -> 3, "yes" -> True). Recipes are typed, so the hooks
below accept only values of the right TOML type: a typo or a quoted number is an error.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, IterableValidationError
from cattrs.v import format_exception, transform_error


def _strict(kind: type, accepts: tuple[type, ...]):
    def hook(value: Any, _type: type) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {kind.__name__}, got a boolean")
        if not isinstance(value, accepts):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return kind(value)

    return hook


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict(int, (int,)))
    conv.register_structure_hook(float, _strict(float, (int, float)))
    conv.register_structure_hook(str, _strict(str, (str,)))
    conv.register_structure_hook(bool, _strict(bool, (bool,)))
    conv.register_structure_hook(Path, lambda v, _: Path(_strict(str, (str,))(v, str)))
    conv.register_unstructure_hook(Path, str)
    return conv


converter = make_converter()


def _format(exc: BaseException, typ: type | None) -> str:
    if typ is not None and typing.get_origin(typ) is typing.Literal:
        choices = ", ".join(repr(c) for c in typing.get_args(typ))
        return f"invalid value (expected one of {choices})"
    # Keep the validator's own words: cattrs' default summary drops them ("invalid value").
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, cattrs.ForbiddenExtraKeysError) and str(exc):
        return f"invalid value ({exc})"
    return format_exception(exc, typ)


def error_messages(exc: BaseException, path: str) -> list[str]:
    """Flatten a cattrs structuring failure into 'message @ $.path' lines."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        return transform_error(exc, path=path, format_exception=_format)
    return [f"{_format(exc, None)} @ {path}"]


def structure(data: Any, cls: type, path: str, *, unchecked: bool = False) -> tuple[Any, list[str]]:
    """(instance, []) on success, (None, messages) on failure. With `unchecked`, a failure of
    field validators only still gives the instance, built without them, so that a caller can go on
    collecting the problems of what the instance names (the recipe's components)."""
    try:
        return converter.structure(data, cls), []
    except Exception as exc:  # cattrs raises several exception families
        first = error_messages(exc, path)
    # attrs stops at the first field whose validator fails, and cattrs can only address that
    # error to the class (`@ $.train`). Structured again without validators, the instance is
    # checked field by field: every bad value, each at its own path (`@ $.train.ema`).
    try:
        with attrs.validators.disabled():
            instance = converter.structure(data, cls)
    except Exception:  # a type error, or a cross-field check of a class: keep the first report
        return None, first
    problems = check_fields(instance, path)
    return (instance if unchecked and problems else None), problems or first


def check_fields(obj: Any, path: str) -> list[str]:
    """Every failing field validator in `obj` and the attrs instances it holds, as
    'message @ $.path.field' lines."""
    problems: list[str] = []
    if attrs.has(type(obj)):
        for field in attrs.fields(type(obj)):
            value, at = getattr(obj, field.name), f"{path}.{field.name}"
            if field.validator is not None:
                try:
                    field.validator(obj, field, value)
                except (ValueError, TypeError) as exc:
                    problems.append(f"{_format(exc, field.type)} @ {at}")
                    continue
            problems += check_fields(value, at)
    elif isinstance(obj, tuple):
        for i, item in enumerate(obj):
            problems += check_fields(item, f"{path}[{i}]")
    return problems


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)
