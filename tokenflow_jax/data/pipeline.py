"""The grain input pipeline: config -> per-process iterator of batches -> global jax.Arrays.

Training::

    source -> index -> [process_index::process_count] -> decode (bad -> another, see replacement.py) -> shuffle
      -> repeat -> random_map(ADM crop, flip, [-1, 1]) -> batch(global / processes, drop rest)
      -> threads -> worker processes (num_workers > 0)

Evaluation: the same shard, no shuffle, centre crop, one pass, padded with ``valid=False`` elements to
the same number of batches on every process (so collective eval steps never hang and exactly N images
are counted).

Every element is a pure function of (seed, process_index, process_count, its position), so
``iterator.get_state()`` / ``set_state()`` resume bit for bit. A batch (numpy, per process)::

    image      float32 [B, S, S, 3] in [-1, 1]   (zeros where not valid)
    caption    str     [B]   (numpy unicode; stays on the host)
    label      int32   [B]   -1 when the source has none (shapes: number of objects)
    index      int32   [B]   record index in the full source, -1 for padding
    valid      bool    [B]   False for padding and, in evaluation, undecodable images
    skipped    int32   [B, len(decode.SKIP_REASONS)]   one-hot reason an element's own record was bad
    bad_images int32   [B]   skipped summed over reasons (sum it for "bad images in this batch")
    converted  int32   [B, len(decode.CONVERSIONS)]    conversions applied to the delivered image

``image_stats(batch)`` sums ``valid``, ``skipped`` and ``converted`` into named metrics.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tokenflow_jax import parallel
from tokenflow_jax.data import decode, replacement, transforms
from tokenflow_jax.data.array_record import ArrayRecordSource
from tokenflow_jax.data.sources import ImageFolderSource, ShapesSource, TfdsSource
from tokenflow_jax.data.steps import AttachIndex, EvalImage, PadToLength, TrainImage
from tokenflow_jax.errors import ConfigError, DataError

SOURCES = ("shapes", "folder", "tfds", "array_record")
CROPS = ("adm", "center")


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """global batch / processes, or a ValueError saying what to change."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ConfigError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the number of processes "
            f"({process_count}); change the batch size in the config"
        )
    return global_batch_size // process_count


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int) -> int:
    """Batches per process of a single evaluation pass (the same on every process)."""
    largest_shard = math.ceil(num_examples / process_count)
    return math.ceil(largest_shard / local_batch_size(global_batch_size, process_count))


def stream_seeds(seed: int, process_index: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed) for this process: processes must not draw the same crops."""
    shuffle_seed, augment_seed = np.random.SeedSequence([seed, process_index]).generate_state(2)
    return int(shuffle_seed), int(augment_seed)


def build_dataset(
    source: Any,
    *,
    image_size: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    train: bool = True,
    crop: str = "adm",
    random_flip: bool = True,
    num_workers: int = 0,
    num_threads: int = 4,
    prefetch_batches: int = 4,
    skip_budget: float = replacement.DEFAULT_SKIP_BUDGET,
) -> grain.IterDataset:
    """The pipeline of the module docstring over any random-access ``source``.

    Returns an IterDataset of batch dicts; ``iter(ds)`` gives an iterator with ``get_state``/``set_state``
    (close it with ``it.close()`` when ``num_workers > 0``: that stops the worker processes).
    Training is endless; evaluation yields ``num_eval_batches(len(source), ...)`` batches.

    Training first surveys a fixed sample of ``source`` (``data/replacement.py``) and raises DataError when
    no image in it decodes; a bad image is replaced after up to ``skip_budget`` x (per-process batch) probes.
    """
    batch = local_batch_size(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if crop not in CROPS:
        raise ConfigError(f"config.data.crop={crop!r}; expected one of {CROPS}")
    num_records = len(source)
    full = grain.MapDataset.source(source).map_with_index(AttachIndex(num_records))
    ds = full[process_index::process_count]  # each process reads only its shard
    if train:
        if len(ds) == 0:
            raise DataError(f"{source!r} has {num_records} records: too few for {process_count} processes")
        budget = replacement.probe_budget(skip_budget, batch)
        usable = decode.survey(full, image_size, what=replacement.describe_source(source))
        shuffle_seed, augment_seed = stream_seeds(seed, process_index)
        ds = decode.DecodeImages(ds, image_size=image_size, replace_bad=True, budget=budget, source=full,
                                 pool=usable.usable)
        ds = ds.shuffle(seed=shuffle_seed).repeat()
        ds = ds.random_map(TrainImage(image_size, crop, random_flip), seed=augment_seed)
    else:
        ds = decode.DecodeImages(ds, image_size=image_size, replace_bad=False)
        ds = PadToLength(ds, num_eval_batches(num_records, global_batch_size, process_count) * batch)
        ds = ds.map(EvalImage(image_size))
    # Batching inside the MapDataset makes batch k = elements [k * batch, (k + 1) * batch) whatever the
    # number of workers: grain slices worker shards after the last MapDataset step, so an IterDataset
    # batch would interleave elements differently for 0 and N workers.
    ds = ds.batch(batch, drop_remainder=train)
    out = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return out


def make_source(config_data: Mapping[str, Any], *, train: bool) -> Any:
    """The source named by ``config_data.source`` (see :data:`SOURCES`)."""
    kind = config_data.get("source")
    split = config_data.get("split") or ("train" if train else "validation")
    if kind == "shapes":
        # A different default seed for evaluation: eval scenes must not be the training scenes.
        shapes_seed = config_data.get("shapes_seed")
        return ShapesSource(
            num_examples=config_data.get("num_examples") or 10_000,
            image_size=config_data.get("shapes_image_size") or config_data["image_size"],
            seed=(0 if train else 1) if shapes_seed is None else shapes_seed,
        )
    if kind in ("folder", "array_record") and not config_data.get("path"):
        raise ConfigError(f"config.data.source={kind!r} needs config.data.path")
    if kind == "folder":
        return ImageFolderSource(config_data["path"], caption_ext=config_data.get("caption_ext") or ".txt")
    if kind == "array_record":
        return ArrayRecordSource(config_data["path"])
    if kind == "tfds":
        if not config_data.get("name"):
            raise ConfigError("config.data.source='tfds' needs config.data.name (e.g. 'imagenet2012')")
        return TfdsSource(
            config_data["name"],
            split,
            config_data.get("data_dir") or None,
            image_key=config_data.get("image_key") or "image",
            caption_key=config_data.get("caption_key") or None,
            raw_image_bytes=config_data.get("raw_image_bytes", True),
        )
    raise ConfigError(f"config.data.source={kind!r}; expected one of {SOURCES}")


def make_dataset(
    config_data: Mapping[str, Any],
    *,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
    train: bool,
) -> grain.IterDataset:
    """The pipeline for ``config.data`` (an ml_collections ConfigDict or a dict).

    Fields: ``source`` ('shapes' | 'folder' | 'tfds' | 'array_record'), ``image_size``; per source
    ``path`` (folder root, ArrayRecord path/glob), ``name``/``split``/``data_dir`` (tfds),
    ``num_examples``/``shapes_seed`` (shapes); optional ``crop`` ('adm' | 'center', training only),
    ``random_flip`` (default True, False for shapes whose captions name left/right), ``num_workers``
    (0: threads only; the stream is the same for any number), ``num_threads`` (batches assembled in parallel
    per process or worker), ``prefetch_batches``, ``skip_budget`` (training: unusable records tolerated per batch
    element while looking for a usable one, see ``data/replacement.py``; default 4).
    """
    if not config_data.get("image_size"):
        raise ConfigError("config.data.image_size must be set (the crop size in pixels)")
    source = make_source(config_data, train=train)
    is_shapes = config_data.get("source") == "shapes"
    flip = config_data.get("random_flip")
    return build_dataset(
        source,
        image_size=config_data["image_size"],
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        train=train,
        # Shapes are drawn at the crop size; a random crop could cut objects the caption counts.
        crop=config_data.get("crop") or ("center" if is_shapes else "adm"),
        random_flip=(not is_shapes) if flip is None else flip,
        num_workers=config_data.get("num_workers") or 0,
        num_threads=config_data.get("num_threads") or 4,
        prefetch_batches=config_data.get("prefetch_batches") or 4,
        skip_budget=config_data.get("skip_budget", replacement.DEFAULT_SKIP_BUDGET),
    )


def to_global_batch(
    local_batch: Mapping[str, Any], mesh: Mesh, keys: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per-process numpy batch -> global jax.Arrays, batch dim over the mesh's data-parallel axes.

    Every process calls this with its own rows; the global batch is their concatenation in process
    order. String fields (captions) stay numpy arrays on the host (this process's rows only).

    Args:
      keys: the fields to return (those missing from the batch are left out); default all of them.
    """
    out: dict[str, Any] = {}
    for key in local_batch if keys is None else [k for k in keys if k in local_batch]:
        value = np.asarray(local_batch[key])
        if value.dtype.kind in "USO":
            out[key] = value
            continue
        sharding = parallel.data_sharding(mesh, value.ndim)
        try:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        except ValueError as e:
            raise ConfigError(
                f"batch field {key!r} with per-process shape {value.shape} cannot be sharded as {sharding.spec} "
                f"over mesh {dict(mesh.shape)}: the per-process batch must divide evenly over this process's "
                f"devices along the data axes; change the batch size in the config or config.mesh.shape ({e})"
            ) from e
    return out


def image_stats(batch: Mapping[str, Any], prefix: str = "data/") -> dict[str, Any]:
    """Sums a batch's bad-image fields into metrics: ``{prefix}skipped``, ``{prefix}skipped/<reason>``,
    ``{prefix}converted/<kind>``, ``{prefix}valid``.

    On a global batch (after :func:`to_global_batch`) the sums are global and returned as jax scalars;
    on a local numpy batch they are this process's ints.
    """
    xp = jnp if isinstance(batch["skipped"], jax.Array) else np
    skipped = xp.sum(batch["skipped"], axis=0)
    converted = xp.sum(batch["converted"], axis=0)
    cast = (lambda x: x) if xp is jnp else int
    stats = {f"{prefix}skipped": cast(skipped.sum()), f"{prefix}valid": cast(xp.sum(batch["valid"]))}
    stats.update({f"{prefix}skipped/{r}": cast(skipped[i]) for i, r in enumerate(decode.SKIP_REASONS)})
    stats.update({f"{prefix}converted/{c}": cast(converted[i]) for i, c in enumerate(decode.CONVERSIONS)})
    return stats


def count_images(counts: MutableMapping[str, float], batch: Mapping[str, Any]) -> None:
    """Adds a process's batch to host-side counters (a trainer's ``LoopTail.counts``): ``bad_images`` (records
    replaced), ``bad_images/<reason>`` for every reason of ``decode.SKIP_REASONS`` and ``converted_images/<kind>``
    for every kind of ``decode.CONVERSIONS`` (zeros included, so every logged row has the same columns)."""
    skipped = np.asarray(batch["skipped"]).sum(axis=0)
    converted = np.asarray(batch["converted"]).sum(axis=0)
    counts["bad_images"] = counts.get("bad_images", 0) + int(skipped.sum())
    for i, reason in enumerate(decode.SKIP_REASONS):
        counts[f"bad_images/{reason}"] = counts.get(f"bad_images/{reason}", 0) + int(skipped[i])
    for i, kind in enumerate(decode.CONVERSIONS):
        counts[f"converted_images/{kind}"] = counts.get(f"converted_images/{kind}", 0) + int(converted[i])


def preview_images(config_data: Mapping[str, Any], count: int, max_records: int = 256) -> np.ndarray:
    """A fixed set of training images for previews: float32 [n, S, S, 3] in [-1, 1], the first ``count`` images
    of the training source (in source order, centre-cropped) that decode, n <= ``count``.

    The same images on every process and after every resume, so preview grids of one run stay comparable.
    At most ``max_records`` records are read (n < count when fewer of them decode).
    """
    source = make_source(config_data, train=True)
    size = int(config_data["image_size"])
    crops = []
    for index in range(min(len(source), max_records)):
        try:
            record = decode.decode_record({**source[index], "index": index}, size)
        except Exception:  # the training pipeline counts bad images; a preview just leaves them out
            continue
        crops.append(transforms.normalize(transforms.center_crop(record["image"], size)))
        if len(crops) == count:
            break
    return np.stack(crops) if crops else np.zeros((0, size, size, 3), np.float32)
