"""How training replaces a record it cannot use, and the check, before training, that some record is usable.

A training pipeline never shrinks a batch: the element of an unusable record (a truncated image, a missing
file, a conversation cut by ``max_length``, ...) is filled with the first usable record among

1. up to ``budget`` probes of the process's shard: the next record (neighbours in a sorted folder tend to be
   alike, e.g. of the same class), then pseudo-random records drawn from a generator seeded by the bad
   record's index, so that a sorted streak of bad files (a broken sub-folder) cannot exhaust the probes as it
   did consecutive ones;
2. the records found usable by :func:`survey` before training, in an order drawn from the same generator, so
   that a dataset with only a few usable records trains on those (they may lie in another process's shard:
   a process whose own shard holds none still trains).

``budget = ceil(skip_budget * per-process batch)`` (``config.data.skip_budget``) scales with the batch: a
batch of B elements tolerates about ``skip_budget`` bad probes per element before it takes survey records.
Every choice is a pure function of the bad record's index, so the stream stays deterministic and a resumed
run continues bit for bit.

:func:`survey` decodes a fixed pseudo-random sample of the whole source (the same on every process, so all
processes agree) and raises one :class:`~tokenflow_jax.errors.DataError` line naming the data and the
commonest reasons when nothing in it is usable: before the model is built or compiled, not as a traceback
at step 0.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from tokenflow_jax.errors import ConfigError, DataError

SURVEY_SIZE = 256  # records sampled before training (all of a smaller source)
POOL_SIZE = 32  # usable records the survey keeps as the last resort; it stops sampling once it has them
DEFAULT_SKIP_BUDGET = 4.0
_SURVEY_SEED = 0x5EED  # fixed: every process and every restart samples the same records
_PROBE_SEED = 0x9B0B

logger = logging.getLogger(__name__)
T = TypeVar("T")


def probe_budget(skip_budget: float, batch_size: int) -> int:
    """``ceil(skip_budget * batch_size)``, at least 1: shard records probed for one bad record."""
    if not isinstance(skip_budget, (int, float)) or isinstance(skip_budget, bool) or not skip_budget > 0:
        raise ConfigError(f"config.data.skip_budget={skip_budget!r}: expected a positive number (unusable records "
                          "tolerated per batch element while looking for a usable one)")
    return max(1, math.ceil(skip_budget * batch_size))


def _generator(index: int) -> np.random.Generator:
    return np.random.default_rng([_PROBE_SEED, index])


def probe_indices(index: int, length: int, budget: int) -> list[int]:
    """Shard indices to try, in order, in place of the bad record at ``index`` of a shard of ``length``:
    ``index + 1`` then pseudo-random ones (all other records, shuffled, when the shard is not larger than
    ``budget``); never ``index`` itself, no repeats, at most ``budget``."""
    index %= length
    if length <= 1:
        return []
    first = (index + 1) % length
    if length - 1 <= budget:
        others = [i for i in _generator(index).permutation(length).tolist() if i not in (index, first)]
        return [first] + others
    draws = _generator(index).integers(0, length, size=2 * budget).tolist()  # spares for repeats
    out = dict.fromkeys([first] + [i for i in draws if i != index])
    return list(out)[:budget]


def pool_order(index: int, pool: Sequence[int]) -> list[int]:
    """The survey's usable records (full-source indices) in the order the bad record at ``index`` tries them."""
    order = _generator(index + (1 << 40)).permutation(len(pool))  # another stream than the probes'
    return [pool[i] for i in order]


def find_replacement(index: int, length: int, budget: int, pool: Sequence[int],
                     try_shard: Callable[[int], tuple[T | None, BaseException | None]],
                     try_source: Callable[[int], tuple[T | None, BaseException | None]]
                     ) -> tuple[T | None, list[BaseException]]:
    """The first usable replacement for the bad record at shard ``index``, in the order of the module docstring:
    ``try_shard`` on the probes of the shard, then ``try_source`` on the survey's ``pool`` (full-source
    indices). Each ``try_*(i)`` returns ``(result, None)`` or ``(None, error)``. Returns the result (None when
    nothing was usable) and the errors met before it."""
    candidates = [(i, try_shard) for i in probe_indices(index, length, budget)]
    candidates += [(i, try_source) for i in pool_order(index, pool)]
    errors: list[BaseException] = []
    for i, attempt in candidates:
        result, error = attempt(i)
        if error is None:
            return result, errors
        errors.append(error)
    return None, errors


def out_of_candidates(index: int, budget: int, pool: Sequence[int], errors: Sequence[BaseException],
                      what: str) -> DataError:
    """The error when neither the probes nor the survey's usable records gave a usable one (those records
    must have changed since the survey: files deleted or overwritten during the run)."""
    last = "; ".join(str(e) for e in errors[-3:])
    return DataError(f"{what}: no usable record to replace the bad one at shard index {index}: the probed records "
                     f"(up to {budget}) and all {len(pool)} records found usable before training are unusable now "
                     f"(were files changed during the run?); the last ones: {last}")


@dataclasses.dataclass(frozen=True)
class Survey:
    """What :func:`survey` found: ``sampled`` records read, full-source indices of the ``usable`` ones (at most
    :data:`POOL_SIZE`), and ``reasons``: reason -> count for the unusable ones."""
    sampled: int
    usable: tuple[int, ...]
    reasons: dict[str, int]

    def summary(self) -> str:
        """'corrupt: 150, not_image: 50' (commonest first)."""
        ranked = sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{reason}: {count}" for reason, count in ranked)


def survey(check: Callable[[int], str | None], length: int, *, what: str, noun: str = "record", hint: str = "",
           sample_size: int = SURVEY_SIZE, pool_size: int = POOL_SIZE) -> Survey:
    """Reads a fixed pseudo-random sample of a source of ``length`` records with ``check(i) -> None`` (usable)
    or a skip reason, until ``pool_size`` usable ones are found or the sample is exhausted.

    Raises:
      DataError: nothing in the sample is usable; one line naming ``what`` (the data), the count and the
        commonest reasons, then ``hint``.
    """
    sample = np.random.default_rng(_SURVEY_SEED).choice(length, size=min(sample_size, length), replace=False)
    usable: list[int] = []
    reasons: collections.Counter = collections.Counter()
    sampled = 0
    for i in sample.tolist():
        sampled += 1
        reason = check(i)
        if reason is None:
            usable.append(i)
            if len(usable) >= pool_size:
                break
        else:
            reasons[reason] += 1
    result = Survey(sampled, tuple(usable), dict(reasons))
    if not usable:
        which = f"all {sampled} {noun}s" + ("" if sampled == length else f" sampled (of {length})")
        raise DataError(f"no usable {noun} in {what}: {which} are unusable ({result.summary()})"
                        + (f"; {hint}" if hint else ""))
    if reasons:
        logger.warning("%s: %d of %d sampled %ss are unusable (%s); training replaces such %ss and counts them",
                       what, sum(reasons.values()), sampled, noun, result.summary(), noun)
    return result


def describe_source(source: Any) -> str:
    """Where a source's records come from, for messages: its folder, file or files, else its repr."""
    for attribute in ("root", "path"):
        if isinstance(value := getattr(source, attribute, None), (str, os.PathLike)):
            return os.fspath(value)
    paths = getattr(source, "paths", None)
    if isinstance(paths, (list, tuple)) and paths and isinstance(paths[0], str):
        return paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more files)"
    return repr(source)
