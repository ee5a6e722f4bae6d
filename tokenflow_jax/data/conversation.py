"""Chat templates, tokenisation and label masks of the LLaVA-style understanding recipe (ByteFlow-AI/TokenFlow
``i2t/scripts/v1_5/train.sh``).

    enc = encode_conversation(record["conversations"], tokenizer, "qwen_2_5", num_image_tokens=729,
                              max_length=2048)                  # input_ids, labels int32 [L], truncated
    prompt = generation_prompt("How many circles are there?", tokenizer, "qwen_2_5", num_image_tokens=729)
    stops = stop_ids(tokenizer, "qwen_2_5")                     # (id of "<|im_end|>", eos)

Conversations are LLaVA's ``[{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]``
(``role``/``content`` and ``user``/``assistant`` are accepted too). Templates, as LLaVA's
``conversation.py`` and TokenFlow's ``i2t/llava`` render them (Q1/A1 the first exchange, Q2/A2 the second;
``[...]`` marks the trained text)::

    plain      "<image>[A1\\n]"          (one turn; the question text is dropped, as LLaVA's preprocess_plain)
    vicuna_v1  "{VICUNA_V1_SYSTEM} USER: <image>\\nQ1 ASSISTANT:[ A1</s>]USER: Q2 ASSISTANT:[ A2</s>]"
    qwen_2_5   "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n"
               "<|im_start|>user\\n<image>\\nQ1<|im_end|>\\n[<|im_start|>assistant\\nA1<|im_end|>\\n]"
               "<|im_start|>user\\nQ2<|im_end|>\\n[<|im_start|>assistant\\nA2<|im_end|>\\n]"
               + every "<|im_start|>", "<|im_end|>" and lone-newline token anywhere (see below)
    qwen_2_5_replies  the same text, trained on "A1<|im_end|>\\n" and "A2<|im_end|>\\n" only
    tokenizer  the tokenizer's own ``chat_template`` (``apply_chat_template``); the trained part of a reply
               is what rendering the reply adds after the generation prompt (reply + end-of-turn tokens)

Trained in plain, vicuna_v1, qwen_2_5_replies and tokenizer: each reply plus the separator that ends it
("</s>", "<|im_end|>\\n", "\\n"), so the model learns to stop; never the role prefixes ("ASSISTANT:"), the
system prompt, the questions or the image.

``qwen_2_5`` follows TokenFlow's ``preprocess_qwen`` (``i2t/llava/train/train.py``) exactly: every
assistant turn is trained whole, its "<|im_start|>assistant\\n" header included; the system and user turns
are not, except that afterwards every token, in any turn, whose id is ``<|im_start|>``, ``<|im_end|>`` or
the newline token (a "\\n" that is a token of its own, as after a role name, after "<image>" and after
"<|im_end|>"; the reference hard-codes Qwen2's id 198) is made a target. So the system prompt and the
questions stay untrained but their markers are. ``qwen_2_5_replies`` keeps the replies-only mask. Both
share the same text, generation prompt and stop ids.

Tokenisation matches LLaVA's ``tokenizer_image_token``: the rendered text is split at the image
placeholder, each side tokenised on its own, and ``num_image_tokens`` copies of :data:`IMAGE_TOKEN_INDEX`
put between them (the model swaps those positions for visual features: the placeholder never goes
through the vocabulary). A BOS is prepended for ``plain``/``vicuna_v1`` when the tokenizer adds one (Llama,
Vicuna), never for the chat-template paths (as ``apply_chat_template``). A token is trained when its
characters overlap a trained part of the text (and, for ``qwen_2_5``, when its id is one of the marker
ids above); labels are aligned with ``input_ids`` (HF convention: the model shifts them by one).
``preprocess_qwen`` tokenises each turn on its own; turns meet at special tokens, which tokenisers split
at first, so tokenising the whole text gives the same ids.

Records that cannot be trained on raise :class:`ConversationError` with ``reason`` in
:data:`SKIP_REASONS`; callers skip and count them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tokenflow_jax.errors import ConfigError, DataError

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # LLaVA's sentinel; never a vocabulary id
IMAGE_PLACEHOLDER = "<image>"

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QWEN_2_5_SYSTEM = "You are a helpful assistant."
TEMPLATES: tuple[str, ...] = ("plain", "vicuna_v1", "qwen_2_5", "qwen_2_5_replies", "tokenizer")
SKIP_REASONS: tuple[str, ...] = (
    "bad_roles",  # no turns, not alternating user/assistant, ends on a question, or plain with != 1 turn
    "empty_reply",  # an assistant turn with no text
    "no_image_placeholder",  # the record has an image but its first question has no "<image>"
    "unexpected_image_placeholder",  # "<image>" in a text-only record or outside the first question
    "image_truncated",  # max_length cuts into (or before) the image tokens
    "no_trained_tokens",  # nothing left to train on after truncation (qwen_2_5's markers count: never there)
)

_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


class ConversationError(DataError):
    """A record that must be skipped; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class RenderedConversation:
    """The template's text (image placeholder still in it) and the character spans ``[start, end)`` whose
    tokens are trained."""

    text: str
    trained_spans: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    input_ids: np.ndarray  # int32 [L]; the image as num_image_tokens x IMAGE_TOKEN_INDEX
    labels: np.ndarray  # int32 [L]; IGNORE_INDEX except on trained tokens, where it equals input_ids
    truncated: bool  # the conversation was cut at max_length
    has_image: bool


# ------------------------------------------------------------------------------------------- turns
def normalize_turns(conversations: Sequence[Mapping[str, Any]], *, has_image: bool) -> list[tuple[str, str]]:
    """LLaVA turns -> ``[(role, text)]`` alternating 'user'/'assistant', starting with 'user', ending with
    'assistant'. A leading non-user turn is dropped (as LLaVA's preprocessing does). With an image, every
    "<image>" of the first question collapses into one at its front, followed by a newline (LLaVA's
    ``preprocess_multimodal``).

    Raises:
      ConversationError: bad_roles, empty_reply, no_image_placeholder, unexpected_image_placeholder.
    """
    turns = []
    for turn in conversations or ():
        role = str(turn.get("from", turn.get("role", ""))).lower()
        text = turn.get("value", turn.get("content"))
        text = "" if text is None else str(text)
        if role in _USER_ROLES:
            turns.append(("user", text))
        elif role in _ASSISTANT_ROLES:
            turns.append(("assistant", text))
        else:
            raise ConversationError("bad_roles", f"unknown role {role!r}; expected one of "
                                    f"{_USER_ROLES + _ASSISTANT_ROLES}")
    if turns and turns[0][0] != "user":
        turns = turns[1:]
    if not turns:
        raise ConversationError("bad_roles", "no user/assistant turns")
    for i, (role, _) in enumerate(turns):
        if role != ("user", "assistant")[i % 2]:
            raise ConversationError("bad_roles", f"turn {i} is {role!r}; turns must alternate user/assistant")
    if len(turns) % 2:
        raise ConversationError("bad_roles", "the conversation ends on a question (no reply to train on)")
    if has_image and IMAGE_PLACEHOLDER not in turns[0][1]:
        raise ConversationError("no_image_placeholder", f"the record has an image but its first question has "
                                f"no {IMAGE_PLACEHOLDER!r}: {turns[0][1][:80]!r}")
    for i, (role, text) in enumerate(turns):
        if role == "assistant" and not text.strip():
            raise ConversationError("empty_reply", f"reply {i // 2} is empty")
        if IMAGE_PLACEHOLDER in text and (i > 0 or not has_image):
            where = "a text-only record" if not has_image else f"turn {i} (only the first question may hold it)"
            raise ConversationError("unexpected_image_placeholder", f"{IMAGE_PLACEHOLDER!r} in {where}")
    if has_image:
        rest = turns[0][1].replace(IMAGE_PLACEHOLDER, "").strip()
        turns[0] = ("user", (IMAGE_PLACEHOLDER + "\n" + rest).strip())
    return turns


def _question_turn(question: str, with_image: bool) -> tuple[str, str]:
    if not with_image and IMAGE_PLACEHOLDER in question:
        raise DataError(f"question {question[:80]!r} holds {IMAGE_PLACEHOLDER!r} but with_image=False")
    rest = question.replace(IMAGE_PLACEHOLDER, "").strip()
    return "user", (IMAGE_PLACEHOLDER + "\n" + rest).strip() if with_image else question


# ------------------------------------------------------------------------------------------ render
Segments = list[tuple[str, bool]]  # (text, trained)


def _plain(turns: list[tuple[str, str]], generation: bool, with_image: bool) -> Segments:
    if not with_image:
        raise ConversationError("no_image_placeholder", "the plain template needs an image")
    if len(turns) != (1 if generation else 2):
        raise ConversationError("bad_roles", f"the plain template takes one question and one reply, got "
                                f"{len(turns)} turns")
    # The question text is dropped: stage-1 alignment trains "image -> caption" only.
    return [(IMAGE_PLACEHOLDER, False)] + ([] if generation else [(turns[1][1] + "\n", True)])


def _vicuna_v1(turns: list[tuple[str, str]], generation: bool, with_image: bool) -> Segments:
    segments = [(VICUNA_V1_SYSTEM + " ", False)]
    for role, text in turns:
        if role == "user":
            segments.append(("USER: " + text + " ", False))
        else:
            # The space after "ASSISTANT:" is trained with the reply, as in LLaVA's preprocess_v1 (a Llama
            # tokenizer merges it into the reply's first token).
            segments += [("ASSISTANT:", False), (" " + text + "</s>", True)]
    return segments + ([("ASSISTANT:", False)] if generation else [])


def _qwen_2_5(turns: list[tuple[str, str]], generation: bool, with_image: bool, *,
              replies_only: bool = False) -> Segments:
    segments = [(f"<|im_start|>system\n{QWEN_2_5_SYSTEM}<|im_end|>\n", False)]
    for role, text in turns:
        if role == "user":
            segments.append((f"<|im_start|>user\n{text}<|im_end|>\n", False))
        else:
            # preprocess_qwen trains the whole assistant turn, header included; _replies trains the reply only.
            segments += [("<|im_start|>assistant\n", not replies_only), (text + "<|im_end|>\n", True)]
    return segments + ([("<|im_start|>assistant\n", False)] if generation else [])


def _qwen_2_5_replies(turns: list[tuple[str, str]], generation: bool, with_image: bool) -> Segments:
    return _qwen_2_5(turns, generation, with_image, replies_only=True)


_SEGMENT_TEMPLATES = {"plain": _plain, "vicuna_v1": _vicuna_v1, "qwen_2_5": _qwen_2_5,
                      "qwen_2_5_replies": _qwen_2_5_replies}
_ADDS_BOS = {"plain": True, "vicuna_v1": True, "qwen_2_5": False, "qwen_2_5_replies": False, "tokenizer": False}


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _apply_chat_template(tokenizer, turns: list[tuple[str, str]], generation: bool) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"template 'tokenizer' needs a tokenizer with a chat_template; "
                          f"{_tokenizer_name(tokenizer) if tokenizer is not None else 'None'} has none (pick "
                          f"one of {TEMPLATES[:-1]})")
    messages = [{"role": role, "content": text} for role, text in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _render_with_chat_template(tokenizer, turns: list[tuple[str, str]]) -> RenderedConversation:
    """Trained span of reply k = what rendering turns[:2k+2] adds to the generation prompt of turns[:2k+1]:
    the reply and the template's end-of-turn text. Needs a template whose renderings extend each other."""
    text = _apply_chat_template(tokenizer, turns, generation=False)
    spans = []
    for k in range(len(turns) // 2):
        prompt = _apply_chat_template(tokenizer, turns[: 2 * k + 1], generation=True)
        upto = _apply_chat_template(tokenizer, turns[: 2 * k + 2], generation=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ConfigError(f"the chat_template of {_tokenizer_name(tokenizer)} renders a conversation that does "
                              "not extend its prefix, so replies cannot be located for the label mask; use "
                              f"one of {TEMPLATES[:-1]}")
        spans.append((len(prompt), len(upto)))
    return RenderedConversation(text, tuple(spans))


def _join(segments: Segments) -> RenderedConversation:
    text, spans, pos = [], [], 0
    for piece, trained in segments:
        if trained:
            spans.append((pos, pos + len(piece)))
        text.append(piece)
        pos += len(piece)
    return RenderedConversation("".join(text), tuple(spans))


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ConfigError(f"conversation template {template!r} (config.text.template); expected one of {TEMPLATES}")


def render(conversations: Sequence[Mapping[str, Any]], template: str, tokenizer=None, *,
           has_image: bool = True) -> RenderedConversation:
    """The template's text of a LLaVA conversation and its trained character spans (``tokenizer`` is only
    needed by the 'tokenizer' template). Raises :class:`ConversationError` for records to skip."""
    _check_template(template)
    turns = normalize_turns(conversations, has_image=has_image)
    if template == "tokenizer":
        return _render_with_chat_template(tokenizer, turns)
    return _join(_SEGMENT_TEMPLATES[template](turns, False, has_image))


def render_generation_prompt(question: str, template: str, tokenizer=None, *, with_image: bool = True) -> str:
    """The text up to where the assistant's reply starts (e.g. '... USER: <image>\\nQ ASSISTANT:')."""
    _check_template(template)
    turns = [_question_turn(question, with_image)]
    if template == "tokenizer":
        return _apply_chat_template(tokenizer, turns, generation=True)
    return _join(_SEGMENT_TEMPLATES[template](turns, True, with_image)).text


# ---------------------------------------------------------------------------------------- tokenise
def _backend(tokenizer):
    # The Rust tokenizer directly: encoding through it only reads it, so grain's reader threads can share
    # one tokenizer (the transformers wrapper re-sets truncation/padding on every call, a mutation that
    # fails with "Already borrowed" under concurrent use).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {_tokenizer_name(tokenizer)} has no fast (tokenizers) backend; character "
                          "offsets are needed for the label mask")
    return backend


def _bos_ids(tokenizer, template: str) -> list[int]:
    """[BOS] when the template prepends it and ``tokenizer(text)`` would add one (Llama), else []."""
    if not _ADDS_BOS[template] or tokenizer.bos_token_id is None:
        return []
    with_specials = _backend(tokenizer).encode("", add_special_tokens=True).ids
    return [int(tokenizer.bos_token_id)] if with_specials[:1] == [tokenizer.bos_token_id] else []


def _tokenize(text: str, tokenizer) -> tuple[list[int], np.ndarray]:
    """ids and character offsets int [T, 2] of ``text`` (no special tokens added)."""
    encoding = _backend(tokenizer).encode(text, add_special_tokens=False)
    return list(encoding.ids), np.asarray(encoding.offsets, np.int64).reshape(-1, 2)


def _trained(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool [T]: the token's characters ``[s, e)`` overlap a trained span (an empty token: contains ``s``)."""
    start, end = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    hit = np.zeros(len(offsets), bool)
    for s, e in spans:
        hit |= (start < e) & (end > s)
    return hit


def _newline_id(tokenizer) -> int | None:
    """The id of a lone newline token, or None. Byte-level BPE and sentencepiece both spell a lone newline
    as one token at the end of "a\\n"."""
    ids, _ = _tokenize("a\n", tokenizer)
    newline = [i for i in ids if tokenizer.decode([i]) == "\n"]
    return newline[-1] if newline else None


_MARKERS = {"qwen_2_5": ("<|im_start|>", "<|im_end|>", "\n")}


def marker_ids(tokenizer, template: str) -> tuple[int, ...]:
    """Ids trained wherever they occur, whatever the character spans say: for ``qwen_2_5`` those of
    "<|im_start|>", "<|im_end|>" and the newline (``preprocess_qwen``'s ``unmask_tokens_idx``); () for the
    other templates."""
    ids = []
    for marker in _MARKERS.get(template, ()):
        # preprocess_qwen hard-codes 198 (Qwen2's "\n"); we ask the tokenizer for its own newline id.
        found = _newline_id(tokenizer) if marker == "\n" else _single_token(tokenizer, marker)
        if found is None:
            raise ConfigError(f"template {template!r} trains every {marker!r} token; {_tokenizer_name(tokenizer)} "
                              "has no such single token")
        ids.append(int(found))
    return tuple(ids)


def tokenize_rendered(rendered: RenderedConversation, tokenizer, template: str, *, num_image_tokens: int,
                      has_image: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(input_ids int32 [L], labels int32 [L], end of the image block: 0 without image), untruncated; the
    labels come from the trained spans only (:func:`encode_conversation` adds :func:`marker_ids`)."""
    pieces = rendered.text.split(IMAGE_PLACEHOLDER)
    if len(pieces) != (2 if has_image else 1):
        raise ValueError(f"template {template!r} rendered {len(pieces) - 1} image placeholders, expected "
                         f"{int(has_image)}: {rendered.text[:200]!r}")
    ids = _bos_ids(tokenizer, template)
    labels = [IGNORE_INDEX] * len(ids)
    image_end, char_pos = 0, 0
    for k, piece in enumerate(pieces):
        if k == 1:
            ids += [IMAGE_TOKEN_INDEX] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            image_end = len(ids)
            char_pos += len(IMAGE_PLACEHOLDER)
        piece_ids, offsets = _tokenize(piece, tokenizer)
        trained = _trained(offsets + char_pos, rendered.trained_spans)
        ids += piece_ids
        labels += [t if keep else IGNORE_INDEX for t, keep in zip(piece_ids, trained)]
        char_pos += len(piece)
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32), image_end


def encode_conversation(conversations: Sequence[Mapping[str, Any]], tokenizer, template: str, *,
                        num_image_tokens: int, max_length: int, has_image: bool = True) -> EncodedConversation:
    """A LLaVA conversation -> ids and labels, cut at ``max_length`` (see the module docstring).

    Args:
      has_image: whether the record comes with an image; then its first question must hold "<image>".

    Raises:
      ConversationError: the record must be skipped (``reason`` in :data:`SKIP_REASONS`).
    """
    if max_length < 1 or num_image_tokens < 1:
        raise ConfigError(f"max_length={max_length} and num_image_tokens={num_image_tokens} must be >= 1")
    rendered = render(conversations, template, tokenizer, has_image=has_image)
    ids, labels, image_end = tokenize_rendered(rendered, tokenizer, template, num_image_tokens=num_image_tokens,
                                               has_image=has_image)
    markers = marker_ids(tokenizer, template)
    if markers:
        labels = np.where(np.isin(ids, markers), ids, labels).astype(np.int32)
    truncated = len(ids) > max_length
    if truncated:
        if image_end > max_length:
            raise ConversationError("image_truncated", f"max_length={max_length} cuts into the image tokens "
                                    f"(they end at {image_end})")
        ids, labels = ids[:max_length], labels[:max_length]
    if not (labels != IGNORE_INDEX).any():
        raise ConversationError("no_trained_tokens", f"no reply token within max_length={max_length}" if truncated
                                else "the template left no token to train on")
    return EncodedConversation(ids, labels, truncated, has_image)


def generation_prompt(question: str, tokenizer, template: str, *, num_image_tokens: int,
                      with_image: bool = True) -> np.ndarray:
    """int32 [P]: the prompt of one question, up to where the reply starts; the image (if any) as
    ``num_image_tokens`` x :data:`IMAGE_TOKEN_INDEX`."""
    text = render_generation_prompt(question, template, tokenizer, with_image=with_image)
    ids, _, _ = tokenize_rendered(RenderedConversation(text, ()), tokenizer, template,
                                  num_image_tokens=num_image_tokens, has_image=with_image)
    return ids


def _single_token(tokenizer, token: str) -> int | None:
    ids, _ = _tokenize(token, tokenizer)
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None


def stop_ids(tokenizer, template: str) -> tuple[int, ...]:
    """Token ids that end a reply: '</s>' (vicuna_v1), '<|im_end|>' (qwen_2_5*), the newline (plain), the
    chat template's end-of-turn token ('tokenizer'); always also the tokenizer's eos."""
    _check_template(template)
    stops = []
    if template == "vicuna_v1":
        stops.append(_single_token(tokenizer, "</s>"))
    elif template in ("qwen_2_5", "qwen_2_5_replies"):
        im_end = _single_token(tokenizer, "<|im_end|>")
        if im_end is None:
            raise ConfigError(f"template {template!r} needs '<|im_end|>' as one token; {_tokenizer_name(tokenizer)} "
                              "has no such token")
        stops.append(im_end)
    elif template == "plain":
        newline = _newline_id(tokenizer)
        if newline is None:
            raise ConfigError(f"template 'plain' stops at a newline, but {_tokenizer_name(tokenizer)} has no "
                              "newline token")
        stops.append(newline)
    else:
        rendered = _render_with_chat_template(tokenizer, [("user", "x"), ("assistant", "y")])
        start, end = rendered.trained_spans[0]
        suffix = rendered.text[start:end]
        ids, _ = _tokenize(suffix[1:] if suffix.startswith("y") else suffix, tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", ())) | set(tokenizer.added_tokens_decoder)
        if ids and ids[0] in special:
            stops.append(ids[0])
    if tokenizer.eos_token_id is not None:
        stops.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(int(s) for s in stops if s is not None))
