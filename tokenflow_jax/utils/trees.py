"""Comparing trees of arrays (or anything with a shape) by path, for errors that list every difference."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np


def path_key_name(k: Any) -> str:
    """One path entry as orbax names it: dict keys, attribute (NamedTuple field) names, list indices."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{'a/b/c': shape}`` for every leaf of ``tree`` (leaves: arrays, ShapeDtypeStructs, anything with a shape)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(path_key_name(k) for k in path): tuple(np.shape(leaf)) for path, leaf in leaves}


def shape_differences(found: Any, expected: Any) -> list[tuple[str, str]]:
    """(path, what) for every leaf missing from ``found``, unexpected in it, or of another shape, in path order:
    ``missing (expected shape S)``, ``unexpected (found shape S)``, ``expected shape S, found T``."""
    have, want = flat_shapes(found), flat_shapes(expected)
    problems = []
    for path in sorted(set(have) | set(want)):
        if path not in have:
            problems.append((path, f"missing (expected shape {want[path]})"))
        elif path not in want:
            problems.append((path, f"unexpected (found shape {have[path]})"))
        elif have[path] != want[path]:
            problems.append((path, f"expected shape {want[path]}, found {have[path]}"))
    return problems
