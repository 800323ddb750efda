"""Strict checks for the arbitrary JSON values the API stores.

Python's `json` module, which FastAPI uses to parse request bodies, accepts
`NaN`, `Infinity`, numbers that overflow to infinity such as `1e999`, and
`\\ud800`-style escapes of lone UTF-16 surrogates. None of these can be
stored and returned as JSON: PostgreSQL rejects them, and the response
serializer fails with a 500 on every later read of the row. The types here
reject them when the request is validated, so FastAPI returns 422 and
nothing is stored. Pydantic's `str` fields already reject lone surrogates,
so only fields of any JSON value need `JsonValue`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator


class InvalidJsonValueError(ValueError):
    """A value is not strict JSON: a lone surrogate, a non-finite number or another type."""


def _describe_path(root: str, parts: list[str | int]) -> str:
    path = root
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f"[{part!r}]"
    return path


def _check_text(text: str, root: str, parts: list[str | int], role: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        surrogate = text[error.start]
        raise InvalidJsonValueError(
            f"{role} at {_describe_path(root, parts)} contains the lone UTF-16 surrogate "
            f"{surrogate!r} at character {error.start}, which is not valid UTF-8"
        ) from None


def check_json_value(value: Any, root: str = "value") -> Any:
    """Return `value` unchanged if it is strict JSON, else raise `InvalidJsonValueError`.

    Strict JSON here means: dicts with string keys, lists, strings that
    encode as UTF-8, finite numbers, booleans and None. The error message
    names the first offending item as a path below `root`, such as
    `payload['items'][2]`.
    """
    # An explicit stack instead of recursion, so deep nesting cannot overflow.
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, parts = stack.pop()
        if item is None or isinstance(item, bool | int):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidJsonValueError(
                    f"number at {_describe_path(root, parts)} is {item!r}; "
                    "JSON numbers must be finite"
                )
        elif isinstance(item, str):
            _check_text(item, root, parts, "string")
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidJsonValueError(
                        f"key {key!r} at {_describe_path(root, parts)} is not a string"
                    )
                _check_text(key, root, parts, "key")
                stack.append((child, [*parts, key]))
        elif isinstance(item, list | tuple):
            stack.extend((child, [*parts, index]) for index, child in enumerate(item))
        else:
            raise InvalidJsonValueError(
                f"value at {_describe_path(root, parts)} has type {type(item).__name__}, "
                "which is not a JSON type"
            )
    return value


# A request field that takes any JSON value. Pydantic puts the field's location
# (such as `body.payload`) in front of the message, so the path starts at `value`.
JsonValue = Annotated[Any, AfterValidator(check_json_value)]
