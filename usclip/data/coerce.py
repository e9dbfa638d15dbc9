"""Plain mappings where an argument expects a dataclass (``synthetic={...}``, ``sources=[{...}]``).

The CLI's parser (jsonargparse) builds the dataclass from the YAML mapping itself; Python callers often pass the
same mapping, which would otherwise be accepted and fail much later (``asdict() should be called on dataclass
instances`` at ``fit``). :func:`as_dataclass` turns the mapping into the dataclass at construction, or refuses it
there naming the argument, the unknown keys and the valid ones. Hand-written because ``dataclasses`` has no
"from dict" and the error must name the argument as the user wrote it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["as_dataclass"]

T = TypeVar("T")


def as_dataclass(value: Any, cls: type[T], name: str) -> T:
    """``value`` as an instance of the dataclass ``cls``: an instance is kept, a mapping is turned into one.

    Args:
        value: an instance of ``cls``, or a mapping of its field names (callers keep ``None`` themselves).
        cls: the dataclass the argument expects.
        name: the argument as a user writes it (``data.synthetic``), for the messages.

    Returns:
        An instance of ``cls``.

    Raises:
        TypeError: if ``value`` is neither a ``cls`` nor a mapping, or a mapping with keys that are no
            field of ``cls`` (named, with a "did you mean" and the valid keys), or without a required field.
    """
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a {cls.__name__} or a mapping of its fields, got {type(value).__name__}: {value!r}"
        )
    fields = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = [str(k) for k in value if k not in fields]
    if unknown:
        raise TypeError(
            f"{name}: {'; '.join(_unknown_key(k, fields) for k in unknown)}; the keys of {cls.__name__} are: "
            f"{', '.join(fields)}"
        )
    required = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [k for k in required if k not in value]
    if missing:
        raise TypeError(f"{name}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    return cls(**dict(value))


def _unknown_key(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
