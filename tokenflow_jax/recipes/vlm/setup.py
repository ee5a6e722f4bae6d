"""What the VLM trainer, ``chat`` and ``eval-vqa`` all build from a ``configs/vlm.py`` config.

    tok_model, tok_vars, tok_config = load_image_tokenizer(config, mesh)   # frozen TokenFlow
    tokenizer = text_tokenizer(config)                                      # with a pad token
    model = vlm.VLM(model_config(config, tok_config, tokenizer))
    batch = to_global(trim_to_bucket(local_batch, length_buckets(config)), mesh)
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from tokenflow_jax import checkpoint
from tokenflow_jax.data import llava, pipeline, replacement
from tokenflow_jax.data import text as text_lib
from tokenflow_jax.errors import CheckpointError, ConfigError
from tokenflow_jax.models import transformer, vlm
from tokenflow_jax.recipes.tokenizer import frozen as frozen_tokenizer
from tokenflow_jax.shapes import vqa as shapes_vqa

logger = logging.getLogger(__name__)

# Per-row fields of a VLM batch that carry the sequence axis (cut to the bucket length).
SEQUENCE_FIELDS = ("input_ids", "labels", "attention_mask")
MODEL_FIELDS = ("image",) + SEQUENCE_FIELDS


def length_buckets(config) -> tuple[int, ...]:
    """``train.length_buckets`` sorted; the longest must be ``data.max_length`` (rows are padded to it)."""
    max_length = int(config.data.max_length)
    buckets = tuple(sorted({int(b) for b in config.train.get("length_buckets", ()) or (max_length,)}))
    if buckets[-1] != max_length or buckets[0] < 1:
        raise ConfigError(f"config.train.length_buckets={tuple(config.train.length_buckets)} must be positive and "
                          f"end at config.data.max_length={max_length}")
    return buckets


def load_image_tokenizer(config, mesh=None):
    """(TokenFlow model, its variables, its config) of ``config.tokenizer``; random weights with a warning
    when ``tokenizer.checkpoint`` is empty (the tiny smoke test)."""
    tok_config = frozen_tokenizer.tokenizer_config(config)
    checkpoint = config.tokenizer.get("checkpoint", "")
    if not checkpoint:
        logger.warning(
            "no tokenizer checkpoint (config.tokenizer.checkpoint): the VLM sees features of a freshly initialised "
            "%s tokenizer, which carry little image content; this run only exercises the pipeline (train a "
            "tokenizer first, then pass --config.tokenizer.checkpoint=DIR/checkpoints)",
            tok_config.get("config_spec", config.tokenizer.config))
    model, variables = frozen_tokenizer.load_tokenizer(tok_config, checkpoint or None, mesh=mesh)
    return model, variables, tok_config


def text_tokenizer(config):
    """The text tokenizer; a Llama tokenizer has no pad token, so pad = unk (LLaVA's choice) or eos."""
    tokenizer = text_lib.load_text_tokenizer(config.text.tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def model_config(config, tok_config, tokenizer=None) -> vlm.VLMConfig:
    """The VLMConfig; ``model.llm.vocab_size = 0`` means the text tokenizer's size. Without ``tokenizer`` a
    non-zero vocabulary is taken as given (nothing is read, for ahead-of-time compiles) and a zero one loads
    the tokenizer to size it."""
    fields = dict(config.model.llm.to_dict())
    if tokenizer is None and not fields["vocab_size"]:
        tokenizer = text_tokenizer(config)
    needed = text_lib.vocab_size(tokenizer) if tokenizer is not None else 0
    if not fields["vocab_size"]:
        fields["vocab_size"] = needed
    elif fields["vocab_size"] < needed:
        raise ConfigError(f"config.model.llm.vocab_size={fields['vocab_size']} is smaller than the text tokenizer's "
                          f"{needed} ids ({config.text.tokenizer})")
    num_tokens, dim = vlm.feature_shape(tok_config, config.model.features)
    return vlm.VLMConfig(llm=transformer.TransformerConfig(**fields), feature_dim=dim, num_image_tokens=num_tokens)


def data_source(config, train: bool = True) -> Any:
    """``data.source``: ``shapes_vqa`` (built in; train / held-out streams) or ``llava`` (``data.path``)."""
    d = config.data
    if d.source == "shapes_vqa":

        return shapes_vqa.ShapesVqaSource(int(d.num_examples), seed=config.seed,
                                          image_size=_image_size(config), kinds=tuple(d.kinds),
                                          split="train" if train else "eval")
    if d.source == "llava":

        if not d.path:
            raise ConfigError("config.data.path is empty: give the LLaVA-format .jsonl / .json file "
                              "(and config.data.image_root for its images)")
        return llava.LlavaJsonlSource(d.path, image_root=d.image_root)
    raise ConfigError(f"config.data.source={d.source!r}: expected 'shapes_vqa' or 'llava'")


def _image_size(config) -> int:
    return int(frozen_tokenizer.tokenizer_config(config).model.image_size)


def train_dataset(config, tok_config, tokenizer, num_image_tokens: int, global_batch: int):
    """The checkpointable per-process batch iterator of the training data."""

    return llava.build_vlm_dataset(
        data_source(config, train=True), tokenizer=tokenizer, template=config.text.template,
        num_image_tokens=num_image_tokens, max_length=int(config.data.max_length),
        image_size=int(tok_config.model.image_size), aspect=config.data.aspect, global_batch_size=global_batch,
        process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed, shuffle=True,
        skip_budget=config.data.get("skip_budget", replacement.DEFAULT_SKIP_BUDGET))


def add_counts(counts: dict[str, float], batch: Mapping[str, Any]) -> None:
    """Accumulates the batch's ``skipped/<reason>`` and ``truncated`` counts into ``counts``."""
    for key, value in batch.items():
        if key == "truncated" or key.startswith("skipped/"):
            counts[key] = counts.get(key, 0.0) + float(np.sum(value))


def _global_max(value: int) -> int:
    if jax.process_count() == 1:
        return value

    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int32))))


def trim_to_bucket(batch: Mapping[str, Any], buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """The model fields of a per-process batch, the sequence axis cut to the smallest bucket that holds the
    longest row of the GLOBAL batch (agreed across processes), with ``attention_mask`` from ``length``."""
    lengths = np.asarray(batch["length"])
    longest = _global_max(int(lengths.max(initial=0)))
    length = next((b for b in buckets if b >= longest), buckets[-1])
    out = {"image": np.asarray(batch["image"]), "length": lengths}
    out["input_ids"] = np.asarray(batch["input_ids"])[:, :length]
    labels = np.asarray(batch["labels"])[:, :length]
    if "valid" in batch:  # padding rows at the end of a finite epoch train nothing
        labels = np.where(np.asarray(batch["valid"], bool)[:, None], labels, -100)
    out["labels"] = labels
    out["attention_mask"] = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return out


def to_global(host: Mapping[str, Any], mesh) -> dict[str, jax.Array]:

    return pipeline.to_global_batch(host, mesh, keys=MODEL_FIELDS)


def params_from_checkpoint(directory: str, params: Any, shardings: Any) -> Any:
    """``params`` with every entry that ``directory`` (a VLM checkpoints dir) holds in the same shape replaced
    by the stored value (stage 2 from stage 1); logs what was not found."""

    target = {"params": checkpoint.abstract_target(jax.eval_shape(lambda p: p, params), shardings)}
    restored, missing = checkpoint.restore_variables_partially(directory, target)
    if not restored:
        raise CheckpointError(f"config.model.init_checkpoint={directory!r} holds none of this model's parameters")
    if missing:
        logger.info("init_checkpoint %s: %d parameters not found there keep their initial values: %s",
                    directory, len(missing), missing[:8])
    flat = traverse_util.flatten_dict(params, sep="/")
    flat.update(traverse_util.flatten_dict(restored["params"], sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")
