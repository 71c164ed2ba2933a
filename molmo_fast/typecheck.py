"""Run-time type checks for config values: one validator for every gin-bound dataclass and the HF config reader.

`check_fields(obj)` compares each field of a dataclass instance with its annotation, so `sequence_length="48"`,
`max_crops="1"` or `bf16="no"` fail at start with the class, field, value and expected type named, instead of a
traceback later or a silently wrong run. Numbers follow Python's tower (an int is a valid float, a bool is not an
int); a tuple field also takes a list, since gin and JSON spell sequences either way.
"""

import dataclasses
import types
import typing
from typing import Any


def matches(value: Any, expected: Any) -> bool:
    """Whether `value` is of the annotated type `expected` (classes, `X | Y`, Optional, list/tuple/dict[...], Any)."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if expected is None or expected is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if (origin or expected) in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args, strict=True))
        return all(matches(v, args[0]) for v in value)
    if (origin or expected) is dict:
        return isinstance(value, dict) and (not args or all(
            matches(k, args[0]) and matches(v, args[1]) for k, v in value.items()))
    return isinstance(value, origin or expected)


def type_name(expected: Any) -> str:
    """`int`, `int or None`, `list[str]`: how an error message names a type."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is None or expected is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(expected, "__name__", str(expected))


class FieldTypeError(TypeError, ValueError):
    """A config field of the wrong type (catchable as TypeError or, with the other config errors, ValueError)."""


def check_fields(obj: Any) -> None:
    """Raises FieldTypeError naming `Class.field`, the value and the expected type for the first mistyped field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not matches(value, hints[f.name]):
            raise FieldTypeError(f"{type(obj).__name__}.{f.name} = {value!r}: expected {type_name(hints[f.name])}, "
                            f"got {type(value).__name__}")
