"""LLaVA-format records (JSONL files, Shapes-VQA) -> fixed-shape batches for the understanding trainer.

    source = LlavaJsonlSource("alignment_2.5m.jsonl", image_root="/data/cambrian")   # or ShapesVqaSource
    ds = build_vlm_dataset(source, tokenizer=tok, template="plain", num_image_tokens=729, max_length=2048,
                           image_size=384, aspect="square", global_batch_size=256, process_index=p,
                           process_count=n, seed=0, shuffle=True)
    it = iter(ds)        # it.get_state() / it.set_state(): the trainer saves it with orbax (checkpoint.py)
    batch = next(it)     # this process's rows; vlm_stats(batch) -> the counts to log

Training::

    source -> index -> [process_index::process_count] -> encode (bad -> another, see replacement.py)
      -> shuffle(seed) -> repeat(num_epochs) -> [pad to the same number of batches on every process]
      -> batch(global / processes) -> threads

As in the image pipeline (``data/decode.py``), a record that cannot be used (missing or broken image, no
"<image>", empty reply, image cut by ``max_length``, bad JSON, an image path outside ``image_root``, ...) is
replaced by another record (``data/replacement.py``) and its reason travels with the replacement
(``skipped/<reason>`` = 1): grain's workers cannot share a counter with the trainer, and the batch shape never
changes. Every element is a pure function of
(seed, process_index, process_count, its position), so the iterator state resumes bit for bit.

A batch (numpy, this process's B rows; M = max_length, S = image_size)::

    image        float32 [B, S, S, 3]  in [-1, 1]; zeros for text-only records and padding
    has_image    bool    [B]
    input_ids    int32   [B, M]  image positions = conversation.IMAGE_TOKEN_INDEX, right-padded with pad id
    labels       int32   [B, M]  IGNORE_INDEX except trained tokens (the template's; aligned with input_ids)
    length       int32   [B]     real tokens (the trainer trims each global batch to a length bucket)
    truncated    bool    [B]     the conversation was cut at max_length
    valid        bool    [B]     False for padding (and, with replace_bad=False, for bad records)
    skipped/<r>  int32   [B]     1 where the element stands in for a record skipped for reason r (one field
                                 per r in SKIP_REASONS: summing a field over the batch gives its count)
    skip_reason  str     [B]     the same reason as text, '' if none
    index        int32   [B]     record index in the full source (-1 for padding)

Image pre-processing (ByteFlow-AI/TokenFlow ``i2t/llava/train/train.py``, ``LazySupervisedDataset``, with
``SigLipImageProcessor`` of ``i2t/llava/model/multimodal_encoder/vision_tokenizer.py``): ``pad`` pastes the
image centred on a square of (127, 127, 127), LLaVA's ``expand2square`` with the SigLIP mean; ``square`` does
not. Then a PIL bicubic resize to S x S and (x / 255 - 0.5) / 0.5.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np
from PIL import Image

from tokenflow_jax.data import conversation, decode, images, paths, replacement
from tokenflow_jax.data.pipeline import local_batch_size, stream_seeds
from tokenflow_jax.data.steps import AttachIndex
from tokenflow_jax.errors import ConfigError, DataError, InputNotFoundError

ASPECTS = ("pad", "square")
PAD_COLOUR = (127, 127, 127)  # int(255 * SigLIP's mean 0.5), what LLaVA pads with
SKIP_REASONS: tuple[str, ...] = (
    conversation.SKIP_REASONS
    + ("image_missing", "image_outside_root") + tuple(f"image_{r}" for r in decode.SKIP_REASONS)
    + ("bad_record",)  # unparsable line, several images, a source error
)
_NO_IMAGE = ("", "none", "nan")  # Cambrian writes these for text-only records
_LOG_LIMIT = 20
_logged = [0]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- source
def _line_offsets(path: str, chunk_bytes: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64 [N] of the non-blank lines of ``path`` (end excludes the newline); the file is
    scanned for newlines in chunks, never parsed."""
    newlines, size = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + size)
            size += len(chunk)
    ends = np.concatenate(newlines + [np.array([size], np.int64)]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    keep = ends - starts >= 2  # a JSON object needs at least "{}"; drops blank and lone-"\r" lines
    return starts[keep], ends[keep]


class LlavaJsonlSource:
    """Random access to a LLaVA/Cambrian JSONL file (one record per line) or a LLaVA ``.json`` list.

    JSONL files are indexed by the byte offsets of their lines (16 bytes a record; a line is parsed only
    when read), so a multi-million-line file costs one newline scan up front. A ``.json`` list must be
    parsed whole; its records are kept as compact JSON lines in one bytes buffer.

    Record: the parsed line with ``id`` (str; the line number if absent) and ``image`` resolved to a path
    under ``image_root`` (default: the file's folder), or None for a text-only record (no ``image``, or
    '', 'None', 'nan'); a list of several images stays a list (skipped later: one image per record).
    ``image_file`` keeps the value as written. A record whose image path is absolute or climbs out of
    ``image_root`` raises ``paths.OutsideRootError`` (``data/paths.py``): nothing outside the root is opened.
    """

    def __init__(self, path: str, image_root: str | None = None):
        self.path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(self.path):
            raise InputNotFoundError(f"LLaVA data file {self.path!r} does not exist")
        self.image_root = os.path.abspath(os.path.expanduser(image_root or os.path.dirname(self.path)))
        self._blob: bytes | None = None
        if self.path.endswith(".json"):
            with open(self.path, encoding="utf-8") as f:
                records = json.load(f)
            if not isinstance(records, list):
                raise DataError(f"{self.path}: a .json data file must hold a list of records, got "
                                f"{type(records).__name__}")
            lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
            lengths = np.array([len(x) + 1 for x in lines], np.int64)
            self._starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            self._ends = self._starts + lengths - 1
            self._blob = b"\n".join(lines)
        else:
            self._starts, self._ends = _line_offsets(self.path)
        if len(self._starts) == 0:
            raise DataError(f"LLaVA data file {self.path!r} holds no records")
        self._fd, self._pid, self._lock = None, None, threading.Lock()

    def __len__(self) -> int:
        return len(self._starts)

    def __getstate__(self):  # grain workers get a copy: without the file handle or lock
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_pid", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _fd=None, _pid=None, _lock=threading.Lock())

    def _read_line(self, index: int) -> bytes:
        start, end = int(self._starts[index]), int(self._ends[index])
        if self._blob is not None:
            return self._blob[start:end]
        with self._lock:
            if self._fd is None or self._pid != os.getpid():  # a forked process needs its own descriptor
                self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        # pread: no shared file position, so grain's reader threads need no lock around the read.
        return os.pread(self._fd, end - start, start)

    def resolve_image(self, value: Any) -> str | list[str] | None:
        """The ``image`` of a line -> an absolute path under ``image_root``, a list of them, or None (text-only).

        Raises:
          paths.OutsideRootError: an absolute path or a '..' escape (counted as ``image_outside_root``).
        """
        if value is None or (isinstance(value, str) and value.strip().lower() in _NO_IMAGE):
            return None
        if isinstance(value, (list, tuple)):
            resolved = [paths.resolve_under(self.image_root, str(v)) for v in value]
            return resolved[0] if len(resolved) == 1 else resolved
        return paths.resolve_under(self.image_root, str(value))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        line = self._read_line(index)
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{self.path}: record {index} is not valid JSON ({e}): {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise DataError(f"{self.path}: record {index} is a {type(record).__name__}, not an object")
        return {**record, "id": str(record.get("id", index)), "image": self.resolve_image(record.get("image")),
                "image_file": record.get("image")}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"LlavaJsonlSource({self.path!r}, {len(self)} records, image_root={self.image_root!r})"


# --------------------------------------------------------------------------------------------- image
def expand_to_square(img: Image.Image, background: tuple[int, int, int] = PAD_COLOUR) -> Image.Image:
    """LLaVA's ``expand2square``: the image centred on a ``background`` square of side max(W, H)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    out = Image.new("RGB", (side, side), background)
    out.paste(img, ((side - width) // 2, (side - height) // 2))
    return out


def preprocess_image(img: Image.Image | np.ndarray, image_size: int, aspect: str = "pad") -> np.ndarray:
    """RGB image (PIL or uint8 [H, W, 3]) -> float32 [image_size, image_size, 3] in [-1, 1] (module
    docstring)."""
    if aspect not in ASPECTS:
        raise ConfigError(f"image aspect {aspect!r} (config.data.aspect); expected one of {ASPECTS}")
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    if aspect == "pad":
        img = expand_to_square(img)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), resample=Image.BICUBIC)
    return images.uint8_to_model(np.asarray(img))


def load_image(image: Any) -> Image.Image:
    """A record's ``image`` (path, encoded bytes, uint8 array, PIL image) -> RGB PIL image.

    Raises:
      images.ImageReadError or decode.BadRecord (see :func:`skip_reason`).
    """
    if isinstance(image, (str, os.PathLike)):
        return images.read_image(os.fspath(image))
    if isinstance(image, (list, tuple)):
        raise DataError(f"the record has {len(image)} images; one image per record is supported")
    return decode.decode_to_rgb(image)[0]


def skip_reason(error: BaseException) -> str:
    """A failure while encoding a record -> one of :data:`SKIP_REASONS`."""
    if isinstance(error, conversation.ConversationError):
        return error.reason
    if isinstance(error, paths.OutsideRootError):
        return "image_outside_root"
    if isinstance(error, images.ImageReadError) and error.reason == "no such file":
        return "image_missing"
    if isinstance(error, (images.ImageReadError, decode.BadRecord)):
        return "image_" + decode.skip_reason(error)
    return "bad_record"


def skip_fields(reason: str | None) -> dict[str, Any]:
    """``{"skipped/<r>": int32 0 or 1 for every r in SKIP_REASONS, "skip_reason": reason or ''}``."""
    if reason is not None and reason not in SKIP_REASONS:
        raise ValueError(f"unknown skip reason {reason!r}")
    fields: dict[str, Any] = {f"skipped/{r}": np.int32(r == reason) for r in SKIP_REASONS}
    fields["skip_reason"] = reason or ""
    return fields


# ------------------------------------------------------------------------------------------- encode
class VlmExampleEncoder:
    """record -> example (module docstring's fields, without the batch axis); picklable.

    Raises (``__call__``): conversation.ConversationError, images.ImageReadError, decode.BadRecord or
    ValueError for a record to skip; :func:`skip_reason` names it.
    """

    def __init__(self, tokenizer: Any, template: str, *, num_image_tokens: int, max_length: int, image_size: int,
                 aspect: str = "pad"):
        if aspect not in ASPECTS:
            raise ConfigError(f"image aspect {aspect!r} (config.data.aspect); expected one of {ASPECTS}")
        if max_length <= num_image_tokens:
            raise ConfigError(f"max_length={max_length} leaves no room for text after {num_image_tokens} image "
                              "tokens; raise config.data.max_length")
        self.tokenizer, self.template, self.aspect = tokenizer, template, aspect
        self.num_image_tokens, self.max_length, self.image_size = num_image_tokens, max_length, image_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        # A tokenizer/template mismatch (no chat_template, no fast backend) must fail here, not be counted
        # as one bad record after another.
        try:
            self._encode([{"from": "human", "value": f"{conversation.IMAGE_PLACEHOLDER}\nx"},
                          {"from": "gpt", "value": "y"}], has_image=True)
        except conversation.ConversationError as e:
            raise ConfigError(f"max_length={max_length} cannot hold even a one-word exchange with an image of "
                              f"{num_image_tokens} tokens in template {template!r} ({e})") from e

    def _encode(self, turns, has_image: bool) -> conversation.EncodedConversation:
        return conversation.encode_conversation(turns, self.tokenizer, self.template,
                                                num_image_tokens=self.num_image_tokens,
                                                max_length=self.max_length, has_image=has_image)

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        has_image = record.get("image") is not None
        # The conversation first: it is cheaper than the image, and a bad one makes the image moot.
        encoded = self._encode(record.get("conversations"), has_image)
        pixels = (preprocess_image(load_image(record["image"]), self.image_size, self.aspect) if has_image
                  else np.zeros((self.image_size, self.image_size, 3), np.float32))
        return self._example(record, pixels, encoded)

    def _example(self, record: Mapping[str, Any] | None, pixels: np.ndarray,
                 encoded: conversation.EncodedConversation | None, reason: str | None = None) -> dict[str, Any]:
        input_ids = np.full((self.max_length,), self.pad_id, np.int32)
        labels = np.full((self.max_length,), conversation.IGNORE_INDEX, np.int32)
        length = 0 if encoded is None else len(encoded.input_ids)
        if encoded is not None:
            input_ids[:length], labels[:length] = encoded.input_ids, encoded.labels
        return {
            "image": pixels,
            "has_image": np.bool_(encoded is not None and encoded.has_image),
            "input_ids": input_ids,
            "labels": labels,
            "length": np.int32(length),
            "truncated": np.bool_(encoded is not None and encoded.truncated),
            "valid": np.bool_(encoded is not None),
            "index": np.int32(-1 if record is None else record.get("index", -1)),
            **skip_fields(reason),
        }

    def invalid(self, record: Mapping[str, Any] | None = None, reason: str | None = None) -> dict[str, Any]:
        """A placeholder element (``valid=False``, nothing trained): a bad record kept in place, or padding."""
        zeros = np.zeros((self.image_size, self.image_size, 3), np.float32)
        return self._example(record, zeros, None, reason)


def _log_bad(index: int, error: BaseException) -> None:
    if _logged[0] < _LOG_LIMIT:
        _logged[0] += 1
        suffix = " (further bad records are only counted)" if _logged[0] == _LOG_LIMIT else ""
        logger.warning("skipping LLaVA record at shard index %d: %s%s", index, error, suffix)


def _encode_at(dataset, encoder: VlmExampleEncoder, index: int):
    """(example, None, record) or (None, error, record if it could be read)."""
    record = None
    try:
        record = dataset[index]
        return encoder(record), None, record
    except Exception as e:  # one record's failure must not end the run: count it instead
        return None, e, record


def survey(source_dataset, encoder: VlmExampleEncoder, *, what: str) -> replacement.Survey:
    """:func:`replacement.survey` of a MapDataset of LLaVA records (the whole source, indexed): which sampled
    records encode. Raises DataError naming ``what`` when none does."""

    def check(index: int) -> str | None:
        _, error, _ = _encode_at(source_dataset, encoder, index)
        return None if error is None else skip_reason(error)

    return replacement.survey(check, len(source_dataset), what=what, noun="record",
                              hint="check config.data.image_root, config.text.template and config.data.max_length")


class EncodeVlmRecords(grain.MapDataset):
    """Encodes every record of ``parent``; a bad one is replaced as ``data/replacement.py`` says (``replace_bad``,
    training: up to ``budget`` probes of ``parent``, then the records of ``source`` at the indices ``pool`` that
    :func:`survey` found usable) or kept as ``encoder.invalid`` (evaluation)."""

    def __init__(self, parent: grain.MapDataset, encoder: VlmExampleEncoder, *, replace_bad: bool = True,
                 budget: int = 32, source: grain.MapDataset | None = None, pool: tuple[int, ...] = ()):
        super().__init__(parent)
        self._encoder, self._replace_bad, self._budget = encoder, replace_bad, budget
        self._source, self._pool = source, tuple(pool) if source is not None else ()

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EncodeVlmRecords(template={self._encoder.template!r}, replace_bad={self._replace_bad})"

    def _try_shard(self, index: int):
        return _encode_at(self._parent, self._encoder, index)[:2]

    def _try_source(self, index: int):
        return _encode_at(self._source, self._encoder, index)[:2]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index %= len(self._parent)  # parents wrap indices around; the probes need it in range
        example, error, record = _encode_at(self._parent, self._encoder, index)
        if error is None:
            return example
        _log_bad(index, error)
        reason = skip_reason(error)
        if not self._replace_bad:
            return self._encoder.invalid(record, reason)
        example, errors = replacement.find_replacement(index, len(self._parent), self._budget, self._pool,
                                                       self._try_shard, self._try_source)
        if example is None:
            raise replacement.out_of_candidates(index, self._budget, self._pool, [error] + errors, "LLaVA records")
        example.update(skip_fields(reason))
        return example


class PadWithInvalid(grain.MapDataset):
    """Appends ``encoder.invalid()`` elements up to ``length`` (the last batch of a finite stream)."""

    def __init__(self, parent: grain.MapDataset, encoder: VlmExampleEncoder, length: int):
        super().__init__(parent)
        if length < len(parent):
            raise ValueError(f"cannot pad {len(parent)} elements to {length}")
        self._encoder, self._length = encoder, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index %= self._length
        return self._parent[index] if index < len(self._parent) else self._encoder.invalid()


# ------------------------------------------------------------------------------------------ dataset
def build_vlm_dataset(
    source: Any,
    *,
    tokenizer: Any,
    template: str,
    num_image_tokens: int,
    max_length: int,
    image_size: int,
    aspect: str = "pad",
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    replace_bad: bool = True,
    skip_budget: float = replacement.DEFAULT_SKIP_BUDGET,
    num_threads: int = 4,
    prefetch_batches: int = 4,
    num_workers: int = 0,
) -> grain.IterDataset:
    """The pipeline of the module docstring over a random-access ``source`` of LLaVA records.

    ``num_epochs=None`` repeats forever; a number gives that many passes, the last batch padded with
    ``valid=False`` elements and every process given the same number of batches (collective train steps
    must not wait on a process that ran out). ``iter()`` of the result is the checkpointable iterator.

    With ``replace_bad`` a fixed sample of ``source`` is checked first (DataError when no record in it is
    usable) and a bad record is replaced after up to ``skip_budget`` x (per-process batch) probes
    (``data/replacement.py``).
    """
    # Lazy: pipeline pulls in jax and flax, which grain's worker processes (they import this module to
    # unpickle the steps above) do not need.

    batch = local_batch_size(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    encoder = VlmExampleEncoder(tokenizer, template, num_image_tokens=num_image_tokens, max_length=max_length,
                                image_size=image_size, aspect=aspect)
    num_records = len(source)
    full = grain.MapDataset.source(source).map_with_index(AttachIndex(num_records))
    ds = full[process_index::process_count]  # each process reads only its shard
    if len(ds) == 0:
        raise DataError(f"{source!r} has {num_records} records: too few for {process_count} processes")
    if replace_bad:
        budget = replacement.probe_budget(skip_budget, batch)
        where = replacement.describe_source(source)
        if isinstance(root := getattr(source, "image_root", None), str):
            where += f" (images under {root})"
        usable = survey(full, encoder, what=where)
        ds = EncodeVlmRecords(ds, encoder, replace_bad=True, budget=budget, source=full, pool=usable.usable)
    else:
        ds = EncodeVlmRecords(ds, encoder, replace_bad=False)
    if shuffle:
        ds = ds.shuffle(seed=stream_seeds(seed, process_index)[0])
    if num_epochs is None:
        ds = ds.repeat()
    else:
        ds = ds.repeat(num_epochs)
        largest_shard = math.ceil(num_records / process_count)
        ds = PadWithInvalid(ds, encoder, math.ceil(largest_shard * num_epochs / batch) * batch)
    # Batching inside the MapDataset: batch k = elements [k * batch, (k + 1) * batch) for any number of
    # workers (see pipeline.build_dataset).
    ds = ds.batch(batch, drop_remainder=True)
    out = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return out


def vlm_stats(batch: Mapping[str, Any], prefix: str = "data/") -> dict[str, Any]:
    """A batch's counts as metrics: ``{prefix}skipped``, ``{prefix}skipped/<reason>``, ``{prefix}truncated``,
    ``{prefix}valid``, ``{prefix}has_image``, ``{prefix}tokens`` (sum of ``length``). Python ints on a
    numpy batch, jax scalars (global sums) on a global batch of jax Arrays."""
    if isinstance(batch["length"], np.ndarray):
        xp, cast = np, int
    else:
        xp = jnp
        cast = lambda x: x  # noqa: E731
    per_reason = {r: xp.sum(batch[f"skipped/{r}"]) for r in SKIP_REASONS}
    stats = {f"{prefix}skipped": cast(sum(per_reason.values()))}
    stats.update({f"{prefix}skipped/{r}": cast(n) for r, n in per_reason.items()})
    for key in ("truncated", "valid", "has_image"):
        stats[f"{prefix}{key}"] = cast(xp.sum(batch[key]))
    stats[f"{prefix}tokens"] = cast(xp.sum(batch["length"]))
    return stats
