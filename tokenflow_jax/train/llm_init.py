"""Initialising the shared decoder of a t2i or VLM model from an HF Llama / Qwen2 checkpoint.

    params = init_from_hf(config, llm_config, params, mesh, rules)    # config.model.init = hub id or path

The checkpoint's architecture must equal the configured one field by field (``model.llm.depth: config 3,
checkpoint 2``); the vocabulary may be larger than the checkpoint's (new rows: the mean of the old ones,
LLaVA's ``smart_tokenizer_and_embedding_resize``). QK-norm scales, which plain Llama lacks, keep their
fresh init (ones), as the t2i reference adds them to a pretrained Llama.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from tokenflow_jax.convert import llm as convert_llm
from tokenflow_jax.convert import sources
from tokenflow_jax.convert.hf import ConversionError
from tokenflow_jax.models.transformer import TransformerConfig
from tokenflow_jax.train import loop

logger = logging.getLogger(__name__)

def init_from_hf(config, ours: TransformerConfig, params: Any, mesh, rules) -> Any:
    """``params`` with ``params['llm']`` replaced by the weights of ``config.model.init`` (placed directly
    into their shardings on ``mesh``); everything else (projector, heads, embeddings) is kept."""

    source = config.model.init
    theirs = convert_llm.config_from_hf(sources.read_config(sources.resolve_model_dir(source)))
    diffs = convert_llm.architecture_differences(ours, theirs)
    if diffs:
        raise ConversionError(f"config.model.init={source!r} does not have the configured decoder shape:\n  "
                              + "\n  ".join(diffs))
    if theirs.qk_norm and not ours.qk_norm:
        raise ConversionError(f"config.model.init={source!r} has QK-norm weights; set config.model.llm.qk_norm=True")
    fields = {f.name: getattr(ours, f.name) for f in dataclasses.fields(ours)}
    fields["qk_norm"] = theirs.qk_norm
    fields.pop("vocab_size")
    _, loaded = convert_llm.load(source, mesh=mesh, rules=rules, vocab_size=ours.vocab_size, **fields)
    merged = dict(params)
    merged["llm"] = loop.merge_trees(params["llm"], loaded)
    logger.info("initialised the decoder from %s", source)
    return merged
