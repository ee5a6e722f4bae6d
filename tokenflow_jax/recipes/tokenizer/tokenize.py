"""Tokenized datasets: a frozen tokenizer's codes for every image of a dataset, in ArrayRecord shards.

``tokenflow-jax tokenize`` encodes a dataset once, so that the text-to-image trainer reads token indices
instead of running the tokenizer in every step. An output directory holds::

    manifest.json                                   what made the tokens (process 0 writes it)
    tokens-P{process:05d}-C{chunk:06d}.arrayrecord  process P's chunk C

Record (msgpack, ``data/array_record.py``)::

    indices  uint16 [L] (int32 when codebook_size > 65536): the codes of every scale, scale by scale, each
             row-major (the tokenizer's ``encode`` output); L = sum(s * s for s in scales).
             :func:`tokenized_source` hands them out as int32.
    caption  str  ('' when the source has none)
    label    int  (-1 when the source has none)
    index    int  the record's index in the source

The data pass is the evaluation pipeline's (``eval/tokenizer_eval.sharded_eval_batches``): centre crop,
one pass, data-parallel over the config's mesh; process ``p`` of ``P`` reads source records
``p, p + P, p + 2P, ...``. Its chunk ``c`` holds its local positions ``[c * C, (c + 1) * C)`` (``C`` =
chunk size) minus the images that could not be decoded (left out, counted in the summary), so a chunk's
records depend only on (source, P, C) and never on the batch size. A chunk is written under ``NAME.tmp``
and renamed once complete: a final name always holds a whole chunk. A re-run into the same directory
keeps the complete chunks, and batches whose records all lie in complete chunks (on every process) are
neither decoded nor encoded.

``manifest.json`` records the format version, ``checkpoint`` (absolute path, '' for random weights),
``checkpoint_step`` (or ``init_seed`` of random weights), ``tokenizer`` (config spec and overrides, dtype,
the ``model`` and ``quantizer`` fields), ``scales``, ``codebook_size``, ``image_size``,
``tokens_per_image``, ``indices_dtype``, ``data`` (source fields, number of source records,
``num_images``), ``chunk_size``, ``process_count`` and, once complete, ``shards`` (file names and record
counts), ``num_records`` and ``num_bad_images``. A re-run whose manifest differs in any field that changes
the tokens or the chunk layout fails and names the field: tokens of two tokenizers never share a
directory.

The output directory must be visible to every process (a local disk for one host; NFS or gcsfuse for
several).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from tokenflow_jax import checkpoint, parallel
from tokenflow_jax.data import pipeline
from tokenflow_jax.data.array_record import ArrayRecordSource, write_array_record
from tokenflow_jax.data.token_shards import (
    FORMAT_VERSION,
    MANIFEST,
    indices_dtype,
    read_manifest,
    shard_name,
)
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.recipes.tokenizer import evaluate as tokenizer_eval

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4096

# Manifest fields that describe a run but do not change its tokens or chunk layout: not compared on re-runs.
_INFORMATIONAL = ("tokenizer.config_spec", "tokenizer.config_overrides", "data.description", "complete",
                  "num_records", "num_bad_images", "shards")
# Performance knobs of the tokenizer config: the same codes whatever their value.
_PERFORMANCE_ONLY = ("quantizer.search_memory_bytes", "quantizer.codebook_axis", ".remat")

# Data fields that name the records, per source (plus ``source`` and ``image_size``).
_DATA_FIELDS = {
    "shapes": ("num_examples", "shapes_seed", "shapes_image_size"),
    "folder": ("path", "caption_ext"),
    "array_record": ("path",),
    "tfds": ("name", "split", "image_key", "caption_key"),
}


# ----------------------------------------------------------------------------------------------------------
# The manifest and its checks.
# ----------------------------------------------------------------------------------------------------------


def tokenize_data_config(config, data: str | None, num_images: int | None = None) -> Any:
    """``config.data`` pointed at ``data``: 'shapes', a folder of images (+ .txt captions), an ArrayRecord
    path/glob, or 'tfds:NAME[:SPLIT]' (default split 'train'); None keeps ``config.data`` as it is.

    The built-in shapes set gets ``num_examples = num_images`` and, unless ``shapes_seed`` is set, the
    training scenes (seed 0): tokenized sets feed training.
    """
    d = config.data.copy_and_resolve_references()
    with d.unlocked():
        if data is None:
            pass
        elif data == "shapes":
            d.source = "shapes"
        elif data.startswith("tfds:"):
            _, name, *split = data.split(":")
            if not name or len(split) > 1:
                raise ConfigError(f"--data {data!r}: expected tfds:NAME or tfds:NAME:SPLIT")
            d.source, d.name, d.split = "tfds", name, split[0] if split else "train"
        elif os.path.isdir(data):
            d.source, d.path = "folder", os.path.abspath(data)
        else:
            d.source, d.path = "array_record", data
        if d.source == "shapes":
            if num_images:
                d.num_examples = int(num_images)
            if d.get("shapes_seed") is None:
                d.shapes_seed = 0
        if not d.get("split"):
            d.split = "train"
    return d


def _describe_data(data_config, source, num_images: int | None) -> dict[str, Any]:
    kind = data_config.get("source")
    fields = {"source": kind, "image_size": data_config.get("image_size")}
    fields.update({k: data_config.get(k) for k in _DATA_FIELDS.get(kind, ())})
    if kind == "array_record" and "," not in fields["path"]:
        fields["path"] = os.path.abspath(os.path.expanduser(fields["path"]))
    fields.update(num_source_records=len(source), num_images=num_images, description=repr(source))
    return fields


def build_manifest(config, checkpoint_dir: str | None, data_config, source, num_images: int | None,
                   chunk_size: int, process_count: int) -> dict[str, Any]:
    """The manifest of a run before it starts (``complete`` False, no shards yet), JSON-normalised."""

    scales = [int(s) for s in config.quantizer.scales]
    k = int(config.quantizer.codebook_size)
    manifest = {
        "format": FORMAT_VERSION,
        "checkpoint": os.path.abspath(checkpoint_dir) if checkpoint_dir else "",
        "checkpoint_step": checkpoint.latest_step(checkpoint_dir) if checkpoint_dir else None,
        "init_seed": None if checkpoint_dir else int(config.get("seed", 0)),  # random weights
        "tokenizer": {
            "config_spec": config.get("config_spec", ""),
            "config_overrides": list(config.get("config_overrides", [])),
            "dtype": config.get("dtype", "float32"),
            "model": config.model.to_dict(),
            "quantizer": config.quantizer.to_dict(),
        },
        "scales": scales,
        "codebook_size": k,
        "image_size": int(config.model.image_size),
        "tokens_per_image": sum(s * s for s in scales),
        "indices_dtype": indices_dtype(k).name,
        "data": _describe_data(data_config, source, num_images),
        "chunk_size": int(chunk_size),
        "process_count": int(process_count),
        "complete": False,
        "num_records": None,
        "num_bad_images": None,
        "shards": [],
    }
    return json.loads(json.dumps(manifest, default=str))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _compared_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    flat = _flatten(manifest)
    keep = lambda k: not k.startswith(_INFORMATIONAL) and not any(p in k for p in _PERFORMANCE_ONLY)
    return {k: v for k, v in flat.items() if keep(k)}


def check_compatible(existing: Mapping[str, Any], new: Mapping[str, Any], path: str) -> None:
    """Raises ValueError naming every field (dotted, e.g. ``quantizer.codebook_size``) where an earlier
    run's manifest ``existing`` and this run's ``new`` disagree on what the tokens or chunks are."""
    missing = object()
    old_fields, new_fields = _compared_fields(existing), _compared_fields(new)
    differ = sorted(k for k in old_fields.keys() | new_fields.keys()
                    if old_fields.get(k, missing) != new_fields.get(k, missing))
    if not differ:
        return
    shown = lambda fields, k: repr(fields[k]) if k in fields else "(absent)"
    lines = [f"{k.removeprefix('tokenizer.')}: {shown(old_fields, k)} there, {shown(new_fields, k)} now"
             for k in differ[:6]]
    more = f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
    raise ConfigError(
        f"{path} was written by a different tokenization; " + "; ".join(lines) + more
        + ". Tokens of different tokenizers, data or chunk layouts must not share a directory: pass another --out, or "
        "delete the directory to start over"
    )


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def prepare_output(out_dir: str, manifest: Mapping[str, Any], is_writer: bool) -> None:
    """Checks ``out_dir``'s manifest against ``manifest`` (ValueError naming the field); then the writer
    process (re)writes ``manifest``, marked incomplete until the run ends."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(path):
        check_compatible(read_manifest(out_dir, require_complete=False), manifest, path)
    elif os.path.isdir(out_dir) and any(n.startswith("tokens-") for n in os.listdir(out_dir)):
        raise ConfigError(f"{out_dir} holds token shards but no {MANIFEST}: their origin is unknown; pass another "
                          "--out or delete them")
    if is_writer:
        os.makedirs(out_dir, exist_ok=True)
        _write_json(path, manifest)


# ----------------------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------------------


def _gather(value: Any) -> np.ndarray:
    """``[processes, *shape]``: ``value`` (a numpy array or scalar) of every process, in process order."""

    if jax.process_count() == 1:
        return np.asarray(value)[None]

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(value)))
    return gathered.reshape(jax.process_count(), *np.shape(value))


def _sync(name: str) -> None:

    if jax.process_count() > 1:

        multihost_utils.sync_global_devices(name)


def _local_rows(array) -> np.ndarray:
    """The rows of a batch-sharded global array that this process contributed, in its local order: the
    inverse of ``jax.make_array_from_process_local_data`` along dim 0 (replicas dropped)."""
    by_start: dict[int, Any] = {}
    for shard in array.addressable_shards:
        by_start.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(by_start[s]) for s in sorted(by_start)])


class _ChunkWriter:
    """This process's chunks: which are complete already, the records of the others, and their writing.

    Local position ``i`` is source record ``process + processes * i``; chunk ``c`` holds positions
    ``[c * chunk_size, (c + 1) * chunk_size)`` of ``[0, num_positions)`` whose image decoded.
    """

    def __init__(self, out_dir: str, process: int, processes: int, num_positions: int, chunk_size: int,
                 dtype: np.dtype):
        self.process, self.processes, self.dtype = process, processes, dtype
        self.num_positions, self.chunk_size = num_positions, chunk_size
        self.num_chunks = math.ceil(num_positions / chunk_size)
        self.paths = [os.path.join(out_dir, shard_name(process, c)) for c in range(self.num_chunks)]
        self.kept = {c for c in range(self.num_chunks) if os.path.isfile(self.paths[c])}
        self.counts = {c: len(ArrayRecordSource(self.paths[c])) for c in self.kept}  # records per chunk
        self.records: dict[int, list[dict[str, Any]]] = {c: [] for c in range(self.num_chunks) if c not in self.kept}
        self.written = 0

    def needed_batches(self, num_batches: int, local_batch: int) -> np.ndarray:
        """bool [num_batches]: the batches holding positions of chunks still to write."""
        needed = np.zeros(num_batches, bool)
        for c in self.records:
            first = c * self.chunk_size
            last = min(first + self.chunk_size, self.num_positions) - 1
            needed[first // local_batch : last // local_batch + 1] = True
        return needed

    def add(self, number: int, local: Mapping[str, Any], indices: np.ndarray) -> None:
        """Takes local batch ``number`` (numpy fields) and its token ``indices`` [local batch, L]."""
        local_batch = len(indices)
        for j in range(local_batch):
            position = number * local_batch + j
            if position >= self.num_positions:
                break  # padding from here on
            chunk = position // self.chunk_size
            if chunk in self.kept:
                continue
            index = self.process + self.processes * position
            if int(local["index"][j]) != index:  # the resume logic relies on this order
                raise RuntimeError(f"the evaluation pipeline delivered record {int(local['index'][j])} at local "
                                   f"position {position} of process {self.process}; expected {index}")
            if local["valid"][j]:
                self.records[chunk].append({"indices": indices[j].astype(self.dtype),
                                            "caption": str(local["caption"][j]), "label": int(local["label"][j]),
                                            "index": index})
            if position == min((chunk + 1) * self.chunk_size, self.num_positions) - 1:  # its last position
                self._write(chunk)

    def _write(self, chunk: int) -> None:
        records, path = self.records.pop(chunk), self.paths[chunk]
        write_array_record(path + ".tmp", records)
        os.replace(path + ".tmp", path)  # a final name only ever holds a complete chunk
        self.counts[chunk] = len(records)
        self.written += 1
        logger.debug("wrote %s (%d records)", path, len(records))


def tokenize_dataset(config, checkpoint_dir: str | None, data_config, out_dir: str, *,
                     num_images: int | None = None, batch_size: int | None = None,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True) -> dict[str, Any]:
    """Encodes the records of ``data_config`` (the first ``num_images``, default all) with the tokenizer of
    ``config`` into ``out_dir`` (layout and resume rules in the module docstring).

    Args:
      batch_size: global batch (default ``config.eval.batch_size``); a multiple of the data-parallel devices.
      chunk_size: records per chunk and process.

    Returns:
      A summary: ``records`` (all in the directory), ``new_records``, ``chunks_written``, ``chunks_kept``
      (complete from an earlier run), ``bad_images`` (undecodable, left out), ``seconds`` (the encode loop,
      compilation included), ``first_batch_seconds``, ``images_per_s`` and ``tokens_per_s`` (images encoded
      by this run over ``seconds``), ``steady_images_per_s`` (after the first batch), ``bytes`` (shard
      files), ``tokens_per_image``.
    """

    if chunk_size <= 0:
        raise ConfigError(f"--chunk-size must be positive, got {chunk_size}")
    if num_images is not None and num_images <= 0:
        raise ConfigError(f"--num-images must be positive, got {num_images}")
    if data_config.get("image_size") != config.model.image_size:
        raise ConfigError(f"config.data.image_size={data_config.get('image_size')} but the tokenizer encodes "
                          f"config.model.image_size={config.model.image_size} images; set them equal")
    batch_size = int(batch_size or config.eval.batch_size)
    process, processes = jax.process_index(), jax.process_count()
    local_batch = pipeline.local_batch_size(batch_size, processes)

    source = pipeline.make_source(data_config, train=False)
    total = min(num_images, len(source)) if num_images else len(source)
    if num_images and num_images > len(source):
        logger.warning("--num-images %d > the %d records of %r: tokenizing all of them", num_images, len(source),
                       source)
    manifest = build_manifest(config, checkpoint_dir, data_config, source, num_images, chunk_size, processes)
    prepare_output(out_dir, manifest, is_writer=process == 0)
    _sync("tokenize: manifest checked")

    writer = _ChunkWriter(out_dir, process, processes, len(range(process, total, processes)), chunk_size,
                          indices_dtype(manifest["codebook_size"]))
    num_batches = math.ceil(len(range(0, total, processes)) / local_batch)  # process 0 has the most records
    # A batch runs when any process needs it: every process must run the same collective steps.
    batches = np.flatnonzero(_gather(writer.needed_batches(num_batches, local_batch)).any(axis=0)).tolist()

    start = end = first_done = time.time()
    if batches:
        model, variables, mesh, rules = tokenizer_eval.tokenizer_on_mesh(config, checkpoint_dir,
                                                                          seed=int(config.get("seed", 0)))
        encode = jax.jit(lambda v, x: model.apply(v, x, method="encode").indices,
                         out_shardings=parallel.data_sharding(mesh, 2))
        stream = tokenizer_eval.sharded_eval_batches(data_config, mesh, batch_size, config.seed, keys=("image",),
                                                     batches=batches)
        bar = tqdm(total=len(batches), unit="batch", desc="tokenize", disable=not progress or process != 0,
                   dynamic_ncols=True)
        start, pending = time.time(), None

        def finish(number, local, indices):
            nonlocal first_done
            writer.add(number, local, _local_rows(indices))
            first_done = time.time() if number == batches[0] else first_done
            bar.update(1)

        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for number, local, batch in stream:
                indices = encode(variables, batch["image"])  # dispatched: write the previous batch meanwhile
                if pending is not None:
                    finish(*pending)
                pending = (number, local, indices)
            if pending is not None:
                finish(*pending)
        bar.close()
        end = time.time()
    if writer.records:
        raise RuntimeError(f"chunks {sorted(writer.records)} of process {process} were never completed")

    # Every process's records per chunk (-1: no such chunk), for the manifest and the summary.
    counts = np.full(math.ceil(len(range(0, total, processes)) / chunk_size), -1, np.int64)
    counts[: writer.num_chunks] = [writer.counts[c] for c in range(writer.num_chunks)]
    new_records = sum(writer.counts[c] for c in range(writer.num_chunks) if c not in writer.kept)
    all_counts = _gather(counts)
    shards = [{"file": shard_name(p, c), "records": int(n)}
              for p in range(processes) for c, n in enumerate(all_counts[p]) if n >= 0]
    num_records = sum(shard["records"] for shard in shards)
    new_records, chunks_written = (int(v) for v in _gather(np.array([new_records, writer.written])).sum(axis=0))
    if process == 0:
        _write_json(os.path.join(out_dir, MANIFEST), dict(manifest, complete=True, num_records=num_records,
                                                          num_bad_images=total - num_records, shards=shards))
    _sync("tokenize: manifest written")

    # Global batch k holds source records [k * batch_size, (k + 1) * batch_size): the images encoded now.
    images = [min((k + 1) * batch_size, total) - k * batch_size for k in batches]
    seconds, steady_seconds, steady_images = end - start, end - first_done, sum(images[1:])
    rate = lambda n, t: n / t if n and t > 0 else 0.0
    return {
        "out_dir": out_dir,
        "records": num_records,
        "new_records": new_records,
        "chunks_written": chunks_written,
        "chunks_kept": len(shards) - chunks_written,
        "bad_images": total - num_records,
        "seconds": seconds,
        "first_batch_seconds": first_done - start if batches else 0.0,
        "images_per_s": rate(sum(images), seconds),
        "tokens_per_s": rate(sum(images) * manifest["tokens_per_image"], seconds),
        "steady_images_per_s": rate(steady_images, steady_seconds),
        "tokens_per_image": manifest["tokens_per_image"],
        "bytes": sum(os.path.getsize(os.path.join(out_dir, shard["file"])) for shard in shards),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    s = summary
    steady = (f", {s['steady_images_per_s']:.1f} images/s after the first batch "
              f"({s['first_batch_seconds']:.1f} s, compilation included)" if s["steady_images_per_s"] else "")
    return (
        f"tokenized {s['records']} records into {s['out_dir']} ({s['new_records']} new in {s['chunks_written']} "
        f"chunks, {s['chunks_kept']} chunks kept from an earlier run, {s['bad_images']} undecodable images left "
        f"out) in {s['seconds']:.1f} s: {s['images_per_s']:.1f} images/s, {s['tokens_per_s']:.0f} tokens/s "
        f"({s['tokens_per_image']} tokens per image){steady}; {s['bytes'] / 2**20:.2f} MiB"
    )


def run(config, checkpoint_dir: str | None, data: str | None, out_dir: str, num_images: int | None = None,
        batch_size: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """``tokenflow-jax tokenize``: tokenizes, prints the summary (process 0) and returns 0."""

    data_config = tokenize_data_config(config, data, num_images)
    summary = tokenize_dataset(config, checkpoint_dir, data_config, out_dir, num_images=num_images,
                               batch_size=batch_size, chunk_size=chunk_size)
    if jax.process_index() == 0:
        print(format_summary(summary))
    return 0
