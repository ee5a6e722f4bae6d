"""Shapes-VQA: questions about the built-in shapes scenes with exact one- or two-word answers.

    source = ShapesVqaSource(num_examples=10_000, seed=0, image_size=64)          # grain random access
    source[i]  # {"id", "image": uint8 [64, 64, 3], "conversations": [...], "category", "answer", ...}
    eval_questions(num_per_category=50, seed=0, image_size=64)     # held-out records, in memory
    write_question_file("eval_dir", num_per_category=50, seed=0)  # the same as questions.jsonl + PNGs
    normalize_answer("Two.") == normalize_answer("2")              # exact-match scoring
    tokenizer = text.load_text_tokenizer("builtin:shapes_chat")    # covers every word used here

Categories (answers are read off the scene, :mod:`tokenflow_jax.shapes.scenes`):

    count     "How many circles are there?" / "... red objects ..." / "... objects ..." -> a digit "0".."4".
              The answer is drawn first (uniformly), then a scene and a subject with that count: left to
              the scenes, "0" and "1" would swamp the category.
    colour    "What colour is the square?"          asked only when the scene has exactly one square
    shape     "What shape is the red object?"       only when exactly one object is red
    position  "Where is the red circle?" -> "top left", "middle centre", ... (shapes.ROW_NAMES, COL_NAMES),
              only when the red circle is unique
    exists    "Is there a red circle?" -> "yes" / "no", each with probability 1/2; half the "no" questions
              are near misses (the shape or the colour is in the scene, not the pair)
    caption   (record kind, not a VQA category) "Describe the image." -> shapes.caption(scene), for the
              stage-1 ``plain`` alignment data

A scene that cannot carry the asked category is redrawn, so every record is a pure function of
``(split, seed, kind, index)``; the train and eval splits draw from different seed namespaces.

Chance (always answering the most frequent answer of the category, :func:`chance`, 20,000 draws of the
train distribution; the eval split draws from the same distribution): count 0.20, colour 0.17, shape 0.34,
position 0.11, exists 0.50 (uniform answers would give 1/5, 1/6, 1/3, 1/9, 1/2).
"""
from __future__ import annotations

import functools
import json
import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from tokenflow_jax.errors import ConfigError
from tokenflow_jax.shapes import scenes as shapes

CATEGORIES: tuple[str, ...] = ("count", "colour", "shape", "position", "exists")
KINDS: tuple[str, ...] = CATEGORIES + ("caption",)
SPLITS: tuple[str, ...] = ("train", "eval")
CAPTION_PROMPT = "Describe the image."
# Where the image goes in a LLaVA record's human turn (LLaVA's DEFAULT_IMAGE_TOKEN; data/conversation.py reads it).
IMAGE_PLACEHOLDER = "<image>"
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "count": ("How many {noun} are there?",),
    "colour": ("What colour is the {shape}?",),
    "shape": ("What shape is the {colour} object?",),
    "position": ("Where is the {colour} {shape}?",),
    "exists": ("Is there {phrase}?",),
    "caption": (CAPTION_PROMPT,),
}
_NAMESPACE = 0x51A7E5  # Shapes-VQA's own stream: no overlap with ShapesSource / ShapesEval generators
_CHANCE_DRAWS = 20_000
_MAX_REDRAWS = 1000


# ------------------------------------------------------------------------------------------ questions
def _count_subjects(scene: Sequence[shapes.ShapeObject]) -> dict[str, int]:
    """Noun of a count question -> how many objects of the scene it covers."""
    counts = {f"{s}s": sum(o.shape == s for o in scene) for s in shapes.SHAPES}
    counts.update({f"{c} objects": sum(o.colour == c for o in scene) for c in shapes.COLOURS})
    counts["objects"] = len(scene)
    return counts


def _count_question(scene: Sequence[shapes.ShapeObject], rng: np.random.Generator,
                    answer: int) -> tuple[str, str] | None:
    nouns = [noun for noun, n in _count_subjects(scene).items() if n == answer]
    if not nouns:
        return None
    return QUESTION_TEMPLATES["count"][0].format(noun=nouns[int(rng.integers(len(nouns)))]), str(answer)


def _unique(scene: Sequence[shapes.ShapeObject], key) -> list[shapes.ShapeObject]:
    """Objects whose ``key`` (shape, colour, or the pair) no other object of the scene shares."""
    tally = Counter(key(o) for o in scene)
    return [o for o in scene if tally[key(o)] == 1]


def _exists_question(scene: Sequence[shapes.ShapeObject], rng: np.random.Generator) -> tuple[str, str]:
    if rng.random() < 0.5:
        obj = scene[int(rng.integers(len(scene)))]
        colour, shape = obj.colour, obj.shape
        answer = "yes"
    else:
        present = {(o.colour, o.shape) for o in scene}
        absent = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        pool = near if near and rng.random() < 0.5 else absent
        colour, shape = pool[int(rng.integers(len(pool)))]
        answer = "no"
    return QUESTION_TEMPLATES["exists"][0].format(phrase=shapes.noun_phrase(1, colour, shape)), answer


def ask(scene: Sequence[shapes.ShapeObject], kind: str, rng: np.random.Generator,
        count: int | None = None) -> tuple[str, str] | None:
    """(question, answer) of ``kind`` about ``scene``, or None when the scene cannot carry that kind (for
    'count': no subject of the scene has ``count`` objects)."""
    if kind == "count":
        return _count_question(scene, rng, count)
    if kind == "exists":
        return _exists_question(scene, rng)
    if kind == "caption":
        return CAPTION_PROMPT, shapes.caption(scene)
    key = {"colour": lambda o: o.shape, "shape": lambda o: o.colour,
           "position": lambda o: (o.colour, o.shape)}.get(kind)
    if key is None:
        raise ValueError(f"Shapes-VQA kind {kind!r}; expected one of {KINDS}")
    candidates = _unique(scene, key)
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    question = QUESTION_TEMPLATES[kind][0].format(shape=obj.shape, colour=obj.colour)
    answer = {"colour": obj.colour, "shape": obj.shape,
              "position": f"{shapes.ROW_NAMES[obj.row]} {shapes.COL_NAMES[obj.col]}"}[kind]
    return question, answer


def draw(kind: str, rng: np.random.Generator) -> tuple[list[shapes.ShapeObject], str, str]:
    """(scene, question, answer): scenes are redrawn until one can carry ``kind``. A count question's
    answer is drawn first, uniformly in 0..MAX_OBJECTS, so the counts are balanced."""
    count = int(rng.integers(shapes.MAX_OBJECTS + 1)) if kind == "count" else None
    for _ in range(_MAX_REDRAWS):
        scene = shapes.sample_scene(rng)
        qa = ask(scene, kind, rng, count)
        if qa is not None:
            return scene, *qa
    raise RuntimeError(f"no scene out of {_MAX_REDRAWS} could carry a {kind!r} question")


def record_rng(split: str, seed: int, kind: str, index: int) -> np.random.Generator:
    """The generator of one record; the split and kind are part of the key, so streams never coincide."""
    if split not in SPLITS:
        raise ValueError(f"Shapes-VQA split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng([_NAMESPACE, SPLITS.index(split), int(seed), KINDS.index(kind), int(index)])


# -------------------------------------------------------------------------------------------- source
class ShapesVqaSource:
    """Random-access LLaVA-format Shapes-VQA records (picklable, for ``grain.MapDataset.source``).

    Record ``i`` is of kind ``kinds[i % len(kinds)]``::

        id             str     "shapes_vqa/{split}/{seed}/{i}"
        image          uint8   [image_size, image_size, 3]
        conversations  [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]
        question, answer, category   str (category = the kind)
        objects        shapes.metadata(scene): shape, colour, cell, position, bbox per object
    """

    def __init__(self, num_examples: int, seed: int, image_size: int, kinds: Sequence[str] = CATEGORIES,
                 split: str = "train"):
        if num_examples <= 0 or image_size <= 0:
            raise ConfigError(f"ShapesVqaSource needs num_examples, image_size > 0; got {num_examples}, {image_size}")
        unknown = [k for k in kinds if k not in KINDS]
        if not kinds or unknown:
            raise ConfigError(f"ShapesVqaSource kinds={tuple(kinds)} (config.data.kinds): expected a non-empty "
                              f"subset of {KINDS}")
        if split not in SPLITS:
            raise ValueError(f"ShapesVqaSource split={split!r}; expected one of {SPLITS}")
        self.num_examples, self.seed, self.image_size = num_examples, seed, image_size
        self.kinds, self.split = tuple(kinds), split

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for ShapesVqaSource of {self.num_examples} examples")
        kind = self.kinds[index % len(self.kinds)]
        scene, question, answer = draw(kind, record_rng(self.split, self.seed, kind, index))
        return {
            "id": f"shapes_vqa/{self.split}/{self.seed}/{index}",
            "image": shapes.render(scene, self.image_size),
            "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                              {"from": "gpt", "value": answer}],
            "question": question,
            "answer": answer,
            "category": kind,
            "objects": shapes.metadata(scene, self.image_size),
        }

    def __repr__(self) -> str:
        return (f"ShapesVqaSource({self.num_examples}, seed={self.seed}, image_size={self.image_size}, "
                f"kinds={self.kinds}, split={self.split!r})")


def eval_questions(num_per_category: int, seed: int, image_size: int,
                   kinds: Sequence[str] = CATEGORIES) -> list[dict[str, Any]]:
    """``num_per_category`` held-out (eval split) records of each kind, in kind order: the records of
    :class:`ShapesVqaSource` (``image`` uint8 [image_size, image_size, 3], ``question``, ``answer``,
    ``category``, ...)."""
    if num_per_category < 1:
        raise ConfigError(f"num_per_category (--num-per-category) must be >= 1, got {num_per_category}")
    out = []
    for kind in kinds:
        source = ShapesVqaSource(num_per_category, seed, image_size, kinds=(kind,), split="eval")
        out += [source[i] for i in range(num_per_category)]
    return out


def write_question_file(out_dir: str, num_per_category: int, seed: int, *, image_size: int = 128,
                        kinds: Sequence[str] = CATEGORIES) -> str:
    """Writes :func:`eval_questions` as ``out_dir/questions.jsonl`` plus ``out_dir/images/*.png``; returns the
    JSONL path. One line per question, in kind order::

        {"id", "image": "images/count_00000.png" (relative to out_dir), "question": "Q",
         "conversations": [human "<image>\\nQ", gpt "A"], "answer": "A", "category": "count"}
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    lines = []
    for i, record in enumerate(eval_questions(num_per_category, seed, image_size, kinds)):
        rel = f"images/{record['category']}_{i % num_per_category:05d}.png"
        Image.fromarray(record["image"]).save(os.path.join(out_dir, rel))
        lines.append(json.dumps({"id": record["id"], "image": rel, "question": record["question"],
                                 "conversations": record["conversations"], "answer": record["answer"],
                                 "category": record["category"]}))
    path = os.path.join(out_dir, "questions.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:  # whole file or none: a re-run never sees half
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


# ------------------------------------------------------------------------------------------ scoring
_NUMBERS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_SPELLING = {"center": "centre", "color": "colour", "gray": "grey"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(answer: str) -> str:
    """Exact-match form: lower case, punctuation and articles dropped, whitespace collapsed, number
    words as digits ('Two.' -> '2'), British spellings ('center' -> 'centre')."""
    words = _PUNCTUATION.sub(" ", str(answer).lower()).split()
    return " ".join(_NUMBERS.get(w, _SPELLING.get(w, w)) for w in words if w not in _ARTICLES)


@functools.cache
def answer_frequencies(category: str, draws: int = _CHANCE_DRAWS, seed: int = 0) -> dict[str, float]:
    """Answer -> frequency over ``draws`` questions of ``category`` (train distribution, one generator)."""
    if category not in CATEGORIES:
        raise ValueError(f"Shapes-VQA category {category!r}; expected one of {CATEGORIES}")
    rng = np.random.default_rng([_NAMESPACE, len(SPLITS), seed, KINDS.index(category)])
    tally = Counter(normalize_answer(draw(category, rng)[2]) for _ in range(draws))
    return {answer: n / draws for answer, n in tally.most_common()}


def chance(category: str) -> float:
    """Accuracy of always giving the most frequent answer of ``category`` (see the module docstring)."""
    return max(answer_frequencies(category).values())


def all_questions() -> list[str]:
    """Every question Shapes-VQA can ask (each template with every filler)."""
    pairs = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    fill = {
        "count": [dict(noun=n) for n in _count_subjects([])],
        "colour": [dict(shape=s) for s in shapes.SHAPES],
        "shape": [dict(colour=c) for c in shapes.COLOURS],
        "position": [dict(colour=c, shape=s) for c, s in pairs],
        "exists": [dict(phrase=shapes.noun_phrase(1, c, s)) for c, s in pairs],
        "caption": [{}],
    }
    return [t.format(**f) for kind, templates in QUESTION_TEMPLATES.items() for t in templates for f in fill[kind]]
