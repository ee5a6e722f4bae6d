"""The training stream over pre-tokenized records (``tokenflow-jax tokenize`` output) for the t2i trainer.

    source -> [process_index::process_count] -> shuffle(seed) -> repeat -> batch(global / processes)

A batch (numpy, this process's rows)::

    indices  int32 [B, N]   image-token indices, scale by scale
    caption  str   [B]
    index    int32 [B]      record index in the source

Like the image pipeline (:mod:`tokenflow_jax.data.pipeline`), every batch is a pure function of (seed,
process_index, process_count, its position), so the iterator's ``get_state`` / ``set_state`` resume exactly.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from tokenflow_jax.data.pipeline import local_batch_size, stream_seeds
from tokenflow_jax.errors import DataError


class TokenRecord(grain.transforms.Map):
    """A stored record -> fixed-dtype fields (int32 indices, str caption, int32 index)."""

    def __init__(self, num_tokens: int):
        self.num_tokens = num_tokens

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        indices = np.asarray(record["indices"], np.int32).reshape(-1)
        if indices.shape[0] != self.num_tokens:
            raise DataError(f"tokenized record {record.get('index')} holds {indices.shape[0]} tokens; the tokenizer "
                            f"config implies {self.num_tokens} (were the shards written with another tokenizer?)")
        return {"indices": indices, "caption": str(record.get("caption") or ""),
                "index": np.int32(record.get("index", -1))}


def build_token_dataset(source: Any, *, num_tokens: int, global_batch_size: int, process_index: int = 0,
                        process_count: int = 1, seed: int = 0, num_threads: int = 4,
                        prefetch_batches: int = 4) -> grain.IterDataset:
    """Endless shuffled batches of ``source`` (random access, e.g. ``ArrayRecordSource``) for training."""
    batch = local_batch_size(global_batch_size, process_count)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise DataError(f"{source!r} has {len(source)} records: too few for {process_count} processes")
    shuffle_seed, _ = stream_seeds(seed, process_index)
    ds = ds.map(TokenRecord(num_tokens)).shuffle(seed=shuffle_seed).repeat().batch(batch, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))
