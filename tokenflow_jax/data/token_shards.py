"""Image-token shards on disk: the format ``tokenflow-jax tokenize`` writes and the t2i trainer reads.

A tokenized dataset is a folder: ``manifest.json`` (format version, the tokenizer's scales and codebook size,
the shard list, completeness) and ArrayRecord shards ``tokens-P{process}-C{chunk}.arrayrecord`` of msgpack
records ``{index, indices [N] (uint16 or int32), caption}``. This module is light on purpose: the trainer's
grain worker processes unpickle :class:`TokenizedSource` and so import it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from tokenflow_jax.data import paths as data_paths
from tokenflow_jax.data.array_record import ArrayRecordSource
from tokenflow_jax.errors import DataError, InputNotFoundError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def shard_name(process: int, chunk: int) -> str:
    return f"tokens-P{process:05d}-C{chunk:06d}.arrayrecord"


def indices_dtype(codebook_size: int) -> np.dtype:
    """uint16 while every code fits (codebook_size <= 65536), else int32."""
    return np.dtype(np.uint16 if codebook_size <= 2**16 else np.int32)


class TokenizedSource(ArrayRecordSource):
    """:class:`ArrayRecordSource` over token shards; ``indices`` come back as int32 ``[L]``."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = super().__getitem__(index)
        record["indices"] = record["indices"].astype(np.int32)
        return record

    def __repr__(self) -> str:
        return f"TokenizedSource({len(self.paths)} files, {len(self)} records)"


def read_manifest(directory: str, require_complete: bool = True) -> dict[str, Any]:
    """The manifest of a tokenized dataset, checked for its format version (and completeness).

    Returns the manifest dict (fields in the module docstring; ``scales``, ``codebook_size``,
    ``tokens_per_image`` are what a trainer checks against its own tokenizer config).
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path} not found: {directory!r} is not a tokenized dataset "
                                 "(make one with `tokenflow-jax tokenize`)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: format {manifest.get('format')!r}, this code reads format {FORMAT_VERSION}")
    if require_complete and not manifest.get("complete"):
        raise DataError(f"{path}: the tokenization is incomplete; re-run the same `tokenflow-jax tokenize` "
                        "command to finish it")
    return manifest


def tokenized_source(directory: str) -> TokenizedSource:
    """All records of a complete tokenized dataset, shard by shard in sorted (process, chunk) order.

    Records are not in source order (processes interleave); ``index`` says where each came from.
    """
    manifest = read_manifest(directory)
    try:  # the manifest names its shards relative to its folder; nothing outside it is read
        paths = [data_paths.resolve_under(directory, shard["file"]) for shard in manifest["shards"]]
    except data_paths.OutsideRootError as e:
        raise DataError(f"{directory}: {MANIFEST} lists a shard outside the folder: {e}") from None
    if missing := [p for p in paths if not os.path.isfile(p)]:
        raise InputNotFoundError(f"{directory}: {len(missing)} shard(s) listed in {MANIFEST} are missing, e.g. "
                                 f"{missing[0]}; re-run `tokenflow-jax tokenize` into this directory")
    source = TokenizedSource(paths)
    if len(source) != manifest["num_records"]:
        raise DataError(f"{directory}: the shards hold {len(source)} records, {MANIFEST} says "
                        f"{manifest['num_records']}")
    return source
