"""What the t2i trainer and the generator both build from a ``configs/t2i.py`` config.

    tok_config = frozen.tokenizer_config(config)           # the frozen image tokenizer's config
    text_tokenizer, prompts = text_parts(config)           # tokenizer + PromptEncoder (prefix of P tokens)
    model = t2i.NextScaleT2I(model_config(config, tok_config, text_tokenizer))
"""
from __future__ import annotations

import logging
from typing import Any

from tokenflow_jax.data import text as text_lib
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import t2i

logger = logging.getLogger(__name__)


def text_parts(config) -> tuple[Any, text_lib.PromptEncoder]:
    """(text tokenizer, PromptEncoder over ``config.model.text_length`` with ``config.text.image_marker``)."""
    tokenizer = text_lib.load_text_tokenizer(config.text.tokenizer)
    return tokenizer, text_lib.PromptEncoder(tokenizer, config.model.text_length, config.text.image_marker)


def model_config(config, tok_config, text_tokenizer=None) -> t2i.T2IConfig:
    """The T2IConfig; ``model.llm.vocab_size = 0`` means: the text tokenizer's T ids (+ [PAD] and K codes for
    the 'extended' head, laid out as ``models/t2i.py`` says). A non-zero vocabulary must cover the tokenizer's
    ids (and [PAD] and the codes); a tokenizer that already holds the codes (the released t2i tokenizer) must
    put ``<vq_token_0>`` where the vocabulary does, V - K.

    Without ``text_tokenizer``, a non-zero vocabulary is taken as given (nothing is read: ahead-of-time
    compiles of the 1b / 7b configs need no download) and a zero one loads the tokenizer to size it.
    """
    if text_tokenizer is None:
        if int(config.model.llm.vocab_size):
            return t2i.t2i_config(config, tok_config)
        text_tokenizer, _ = text_parts(config)
    text_vocab = text_lib.text_vocab_size(text_tokenizer)
    k = tok_config.quantizer.codebook_size
    extended = config.model.head == "extended"
    extra = 1 + k if extended else 0
    vocab = int(config.model.llm.vocab_size)
    if not vocab:
        vocab = text_vocab + extra
    elif vocab < text_vocab + extra:
        raise ConfigError(
            f"config.model.llm.vocab_size={vocab} is smaller than the text tokenizer's {text_vocab} ids"
            + (f" + [PAD] + {k} image codes (head='extended')" if extra else "")
            + f" = {text_vocab + extra}")
    first_code = text_lib.first_image_code_id(text_tokenizer)
    if extended and first_code is not None and first_code != vocab - k:
        raise ConfigError(f"config.text.tokenizer={config.text.tokenizer!r} puts <vq_token_0> at id {first_code}, but "
                          f"config.model.llm.vocab_size={vocab} with {k} codes puts it at {vocab - k}")
    return t2i.t2i_config(config, tok_config, vocab_size=vocab)
