"""The one strict cattrs converter, and path-addressed error messages.

cattrs by default coerces ("3" -> 3, 3.7 -> 3, "yes" -> True). Recipes are typed, so the hooks
below accept only values of the right TOML type: a typo or a quoted number is an error.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

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


def structure(data: Any, cls: type, path: str) -> tuple[Any, list[str]]:
    """(instance, []) on success, (None, messages) on failure."""
    try:
        return converter.structure(data, cls), []
    except Exception as exc:  # cattrs raises several exception families
        return None, error_messages(exc, path)


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)
