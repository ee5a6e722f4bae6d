"""Turning ml_collections nodes into the frozen dataclasses that models take as fields.

Models hold frozen (hashable) dataclasses, not ConfigDicts, so Linen modules stay pure values. This
is the one place where config fields meet them: an unknown or missing field, or a value that a
dataclass rejects, becomes an error naming the full config path.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def to_dataclass(cls: type[T], node: Any, path: str, **extra: Any) -> T:
    """Builds ``cls`` from the mapping ``node`` (a ConfigDict or dict) found at config ``path``.

    Sequences become tuples (hashable); ``extra`` supplies already-built nested fields.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(node.items() if hasattr(node, "items") else node)
    unknown = sorted(set(values) - set(fields) - set(extra))
    if unknown:
        raise ValueError(f"config.{path}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k not in extra}
    kwargs.update(extra)
    missing = sorted(
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(f"config.{path}: missing field(s) {missing}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{path}: {e}") from e
