"""Text tokenizers and the text prefix of the next-scale model (ByteFlow-AI/TokenFlow
``t2i/llava_t2i/dataset/process.py``, ``crop_and_encode_text_and_img``).

    tokenizer = load_text_tokenizer("builtin:shapes")         # or a local path / HF hub id
    encoder = PromptEncoder(tokenizer, length=24, image_marker="<img>")
    prompts = encoder(["a red circle", "two blue squares"])   # ids / mask [B, 24], truncated [B]

The prefix of every row is ``[PAD] x m, BOS, caption tokens, tokens(image_marker)``, left-padded to
``length`` positions (the reference's ``max_text_token_num`` padding plus the "<img>" string tokenised as
ordinary text), so the image block starts at the same position in every row. Captions too long for the
room left after BOS and the marker are cut at the end and flagged in ``truncated``: callers count and
report them.

``builtin:shapes`` is a word-level tokenizer over the closed vocabulary of the built-in shapes captions
(``tokenflow_jax.shapes.scenes``), built offline with ``tokenizers`` and wrapped as a transformers
``PreTrainedTokenizerFast``, so the rest of the code treats it like any ``AutoTokenizer``. Its ids are a
pure function of that vocabulary: no file needs saving next to a checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import sentencepiece

from tokenflow_jax.data import conversation
from tokenflow_jax.errors import ConfigError, InputNotFoundError
from tokenflow_jax.shapes import scenes as shapes
from tokenflow_jax.shapes import vqa as shapes_vqa

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "<s>", "</s>"


def shapes_vocabulary() -> list[str]:
    """Every word the shapes captions and the ShapesEval prompts use, in a fixed order."""
    words = ["a", "an", "and", ",", "on", "the", "of", "above", "below"]
    words += list(shapes.COL_NAMES) + list(shapes.ROW_NAMES)  # left/centre/right, top/middle/bottom
    words += list(shapes.COLOURS)
    words += [s for shape in shapes.SHAPES for s in (shape, shape + "s")]
    words += [shapes.NUMBER_WORDS[n] for n in sorted(shapes.NUMBER_WORDS)]
    words += [str(n) for n in range(10)]
    return list(dict.fromkeys(words))  # dedupe, keep order


def build_shapes_tokenizer():
    """The ``builtin:shapes`` tokenizer: lower-cased words and punctuation, unknown words -> [UNK]."""
    # deferred: transformers takes seconds to import and only the text recipes need it
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, UNK, BOS, EOS]
    vocab = {token: i for i, token in enumerate(specials + shapes_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                        eos_token=EOS)
    # The image markers are whole tokens here (a real LLM tokenizer splits them into ordinary pieces).
    tokenizer.add_tokens(["<img>", "</img>"])
    return tokenizer


# ------------------------------------------------------------------------- the Shapes-VQA chat tokenizer
_WORD = re.compile(r"\n|\w+|[^\w\s]+")  # the tokenizer's pre-tokenizer, in Python
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + conversation.QWEN_2_5_SYSTEM
    + "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_vocabulary() -> list[str]:
    """Every word of the questions, answers, captions, system prompts and role names, in a fixed order."""
    texts = shapes_vqa.all_questions() + [conversation.VICUNA_V1_SYSTEM, conversation.QWEN_2_5_SYSTEM]
    texts += ["USER: ASSISTANT: system user assistant yes no"] + list(shapes.ROW_NAMES + shapes.COL_NAMES)
    texts += shapes_vocabulary()  # captions (and ShapesEval prompts)
    words = [w.lower() for t in texts for w in _WORD.findall(t)]
    return list(dict.fromkeys(w for w in ["\n"] + words + [str(n) for n in range(10)] if w not in SPECIAL_TOKENS))


def build_shapes_chat_tokenizer():
    """``builtin:shapes_chat``: lower-cased words, punctuation and newlines; '</s>' is eos, '<|im_start|>'
    and '<|im_end|>' are special tokens; a ChatML chat_template (the qwen_2_5 format). No BOS is added."""
    # deferred: transformers takes seconds to import and only the text recipes need it
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + chat_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    # Whitespace() would drop newlines, which end replies in the plain template: keep them as tokens.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD.pattern), behavior="removed", invert=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


BUILTIN_TOKENIZERS = {"shapes": build_shapes_tokenizer, "shapes_chat": build_shapes_chat_tokenizer}


def load_text_tokenizer(spec: str):
    """``builtin:NAME``, a local directory, or a HF hub id (``transformers.AutoTokenizer``)."""
    if not spec:
        raise ConfigError("config.text.tokenizer is empty: give 'builtin:shapes', a local path or a HF hub id")
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_TOKENIZERS:
            raise ConfigError(f"config.text.tokenizer={spec!r}: unknown built-in tokenizer; known: "
                              f"{[BUILTIN_PREFIX + k for k in BUILTIN_TOKENIZERS]}")
        return BUILTIN_TOKENIZERS[name]()
    from transformers import AutoTokenizer  # deferred: seconds to import, only for hub / local tokenizers

    try:
        return AutoTokenizer.from_pretrained(spec)
    except OSError as e:
        raise InputNotFoundError(
            f"config.text.tokenizer={spec!r}: no tokenizer found as a local directory or on the hub ({e}); "
            "offline machines need a local copy (huggingface-cli download ... --local-dir DIR)") from e


def vocab_size(tokenizer) -> int:
    """Ids the embedding table must cover: the base vocabulary plus added tokens."""
    return len(tokenizer)


def image_code_token(index: int) -> str:
    """The released t2i tokenizer's name of image code ``index`` (the official ``DEFAULT_VQ_TOKEN_TEMPLATE``)."""
    return f"<vq_token_{index}>"


def first_image_code_id(tokenizer) -> int | None:
    """The id of ``<vq_token_0>`` when the tokenizer already holds the image codes (the released t2i folder's
    tokenizer does), else None."""
    token = image_code_token(0)
    if token not in tokenizer.get_vocab():
        return None
    return int(tokenizer.convert_tokens_to_ids(token))


def text_vocab_size(tokenizer) -> int:
    """T, the number of text ids: ``len(tokenizer)``, or, for a tokenizer that already holds ``[PAD]`` and the
    ``<vq_token_i>`` codes after its text ids (the released t2i tokenizer), the ids below that ``[PAD]``."""
    first = first_image_code_id(tokenizer)
    if first is None:
        return vocab_size(tokenizer)
    pad = tokenizer.get_vocab().get(PAD)
    if pad != first - 1:
        raise ConfigError(f"text tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: {image_code_token(0)} has id "
                          f"{first} but {PAD} has id {pad}; the t2i vocabulary layout needs [PAD] = T right before the "
                          f"codes at T + 1")
    return first - 1


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
    ids: np.ndarray  # int32 [B, P], left-padded
    mask: np.ndarray  # int32 [B, P], 1 = token, 0 = padding
    truncated: np.ndarray  # bool [B], the caption was cut to fit


class SentencePieceText:
    """Text -> ids exactly as the official scripts' slow Llama tokenizer gives them.

    The released t2i scripts tokenise prompts with ``AutoTokenizer.from_pretrained(..., use_fast=False)``
    (transformers 4.43): the sentencepiece model itself, after splitting out added / special tokens written in
    the text (``<s>``, ``</s>``, ``[PAD]``, ``<vq_token_i>``), each other piece encoded on its own (legacy
    mode, the 4.43 default). transformers 5 drops ``use_fast=False`` and converts ``tokenizer.model`` into a
    ``tokenizers`` BPE that differs from sentencepiece on every prompt that starts with a space, on many with
    a run of two or more spaces (Llama-2's whitespace-only pieces rank last in sentencepiece, first in the
    conversion: 574 of 1,337 such prompts) and after added tokens (``tests/data/test_prompt_tokenizer_parity.py``
    measures this against transformers 4.43.4's own ids). So a tokenizer that carries its sentencepiece model
    (``vocab_file`` = ``tokenizer.model``) encodes text through it. Plain text is exact in either ``legacy``
    mode; text with added-token strings follows legacy mode (a ``legacy: false`` tokenizer is warned about).
    """

    _ADDED = re.compile(r"(<[^<>\s]+>|\[[A-Z]+\])")  # candidates; only the tokenizer's added tokens split

    def __init__(self, model_file: str, added_tokens: Mapping[str, int]):
        self.processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.added = dict(added_tokens)

    def __call__(self, text: str) -> list[int]:
        ids: list[int] = []
        plain = ""  # text between added tokens (a candidate that is not one stays plain text)
        for piece in self._ADDED.split(text):
            if piece in self.added:
                ids.extend(self.processor.encode(plain) if plain else [])
                ids.append(int(self.added[piece]))
                plain = ""
            else:
                plain += piece
        return ids + (self.processor.encode(plain) if plain else [])

    @classmethod
    def of(cls, tokenizer: Any) -> SentencePieceText | None:
        """The sentencepiece encoder of ``tokenizer`` when it was loaded from a ``tokenizer.model``, else None."""
        model_file = getattr(tokenizer, "vocab_file", None)
        if not (isinstance(model_file, str) and model_file.endswith(".model") and os.path.isfile(model_file)):
            return None
        if tokenizer.init_kwargs.get("legacy") is False:
            logger.warning("%s sets legacy: false; prompts are encoded in legacy mode, which gives the official ids "
                           "for plain text but may differ around added-token strings written in a prompt",
                           getattr(tokenizer, "name_or_path", model_file))
        return cls(model_file, tokenizer.added_tokens_encoder)


class PromptEncoder:
    """Captions -> left-padded prefixes ``[PAD].., BOS, caption, marker`` of ``length`` tokens.

    Text is encoded with :class:`SentencePieceText` when the tokenizer carries its sentencepiece model (the
    Llama tokenizers of the 1b / 7b recipes: ids equal to the official scripts'), else with the tokenizer.
    """

    def __init__(self, tokenizer: Any, length: int, image_marker: str = "<img>"):
        self.tokenizer = tokenizer
        self.length = int(length)
        sentencepiece_text = SentencePieceText.of(tokenizer)
        self.encode_text = sentencepiece_text or (
            lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        self.marker_ids = self.encode_text(image_marker) if image_marker else []
        self.bos_ids = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self.room = self.length - len(self.bos_ids) - len(self.marker_ids)
        if self.room < 0:
            raise ConfigError(f"text length {self.length} cannot hold BOS and the image marker {image_marker!r} "
                              f"({len(self.bos_ids) + len(self.marker_ids)} tokens); raise config.model.text_length")

    def __call__(self, texts: Sequence[str]) -> EncodedPrompts:
        b = len(texts)
        ids = np.full((b, self.length), self.pad_id, np.int32)
        mask = np.zeros((b, self.length), np.int32)
        truncated = np.zeros((b,), bool)
        encoded = [self.encode_text(text) for text in texts]
        for row, caption in enumerate(encoded):
            truncated[row] = len(caption) > self.room
            tokens = self.bos_ids + list(caption[: self.room]) + self.marker_ids
            ids[row, self.length - len(tokens):] = tokens
            mask[row, self.length - len(tokens):] = 1
        return EncodedPrompts(ids, mask, truncated)
