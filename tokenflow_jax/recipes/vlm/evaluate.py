"""``tokenflow-jax eval-vqa``: exact-match accuracy of a VLM checkpoint on a question file or Shapes-VQA.

    tokenflow-jax eval-vqa --config configs/vlm.py:tiny --checkpoint RUN/checkpoints [--data builtin]
        [--num-per-category 50] [--out FILE.json]
    tokenflow-jax eval-vqa --checkpoint RUN/checkpoints --data questions.jsonl     # image, question, answer

``--data builtin`` draws the held-out Shapes-VQA questions (a seed stream disjoint from training); a JSONL
file has one question per line: ``image`` (path, relative to the file's folder and inside it), ``question`` (or LLaVA
``conversations`` whose first human turn is the question), ``answer`` and optionally ``category``.
Answers are generated in global batches of ``generate.batch_size`` sharded over the devices, normalised
(lower case, punctuation and articles dropped, number words as digits) and compared exactly. Every
figure comes with its chance level: the accuracy of always giving the most frequent answer of the
category in this very question set.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tokenflow_jax.data import images as image_io
from tokenflow_jax.data import paths
from tokenflow_jax.errors import DataError, InputNotFoundError
from tokenflow_jax.recipes.tokenizer import frozen
from tokenflow_jax.recipes.vlm.answer import VqaModel
from tokenflow_jax.shapes import vqa as shapes_vqa
from tokenflow_jax.shapes.vqa import normalize_answer
from tokenflow_jax.utils import batching
from tokenflow_jax.utils.logs import progress_bar

logger = logging.getLogger(__name__)


def builtin_questions(config, num_per_category: int) -> list[dict[str, Any]]:
    """Held-out Shapes-VQA questions: {image uint8 [H, W, 3], question, answer, category}."""

    size = int(frozen.tokenizer_config(config).model.image_size)
    return shapes_vqa.eval_questions(num_per_category, seed=config.seed, image_size=size,
                                     kinds=tuple(k for k in config.data.kinds if k != "caption"))


def file_questions(path: str) -> list[dict[str, Any]]:
    """Questions of a JSONL file; bad lines are named with ``file:line``."""

    if not os.path.isfile(path):
        raise InputNotFoundError(f"question file {path!r} does not exist")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question = row.get("question")
                if question is None:
                    question = next(t["value"] for t in row["conversations"] if t["from"] == "human")
                question = question.replace("<image>", "").strip()
                image = np.asarray(image_io.read_image(paths.resolve_under(root, row["image"])))
                out.append({"image": image, "question": question, "answer": str(row["answer"]),
                            "category": row.get("category", "all")})
            except paths.OutsideRootError as e:
                raise DataError(f"{path}:{number}: {e} (image paths are relative to the question file's folder)") \
                    from e
            except (AttributeError, KeyError, TypeError, StopIteration, json.JSONDecodeError, OSError,
                    image_io.ImageReadError) as e:
                raise DataError(f"{path}:{number}: not a usable question ({type(e).__name__}: {e}); expected JSON "
                                 "with 'image', 'question' (or 'conversations') and 'answer'") from e
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def score(questions: Sequence[dict[str, Any]], answers: Sequence[str]) -> dict[str, Any]:
    """Per-category and overall exact-match accuracy with the majority-answer chance level."""

    by_category: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for q, a in zip(questions, answers):
        by_category[q["category"]].append((normalize_answer(q["answer"]), normalize_answer(a)))
    table: dict[str, Any] = {}
    correct_all = chance_all = 0
    for category in sorted(by_category):
        pairs = by_category[category]
        correct = sum(t == p for t, p in pairs)
        majority = collections.Counter(t for t, _ in pairs).most_common(1)[0][1]
        table[category] = {"n": len(pairs), "accuracy": correct / len(pairs), "chance": majority / len(pairs)}
        correct_all += correct
        chance_all += majority
    n = len(answers)
    table["overall"] = {"n": n, "accuracy": correct_all / n, "chance": chance_all / n}
    return table


def format_table(table: dict[str, Any]) -> str:
    lines = ["| category | n | accuracy | chance (majority answer) |", "|---|---:|---:|---:|"]
    for name, row in table.items():
        bold = "**" if name == "overall" else ""
        lines.append(f"| {bold}{name}{bold} | {row['n']} | {bold}{100 * row['accuracy']:.1f}%{bold} | "
                     f"{100 * row['chance']:.1f}% |")
    return "\n".join(lines)


def evaluate(vqa, questions: Sequence[dict[str, Any]], batch_size: int, progress: bool = True) -> list[str]:
    """Answers for every question, in global batches (the last one padded by repetition)."""

    answers: list[str] = []
    bar = progress_bar(0, len(questions), progress and jax.process_index() == 0, "eval-vqa", unit="question")
    for start in range(0, len(questions), batch_size):
        chunk = list(questions[start : start + batch_size])
        rows = batching.pad_rows(chunk, batch_size)
        out = vqa.answer([q["image"] for q in rows], [q["question"] for q in rows])
        answers += out[: len(chunk)]
        bar.update(len(chunk))
    bar.close()
    return answers


def run(config, checkpoint_dir: str, data: str, out: str | None, num_per_category: int = 50,
        vqa: VqaModel | None = None) -> int:
    """The ``eval-vqa`` command; ``vqa``: a model already loaded (a unified run's), else the VLM restored."""

    questions = builtin_questions(config, num_per_category) if data == "builtin" else file_questions(data)
    vqa = vqa or VqaModel.load(config, checkpoint_dir)
    batch = int(config.generate.batch_size)
    data_ways = int(np.prod([vqa.mesh.shape[a] for a in ("data", "fsdp") if a in vqa.mesh.shape]))
    batch = max(data_ways, batch // data_ways * data_ways)  # divisible over the data axes
    start = time.time()
    answers = evaluate(vqa, questions, batch)
    seconds = time.time() - start
    table = score(questions, answers)
    print(format_table(table))
    logger.info("%d questions in %.1f s (%.1f questions/s)", len(questions), seconds, len(questions) / seconds)
    out = out or os.path.join(checkpoint_dir, "vqa_eval.json")
    if jax.process_index() == 0:
        examples = [{"question": q["question"], "answer": q["answer"], "prediction": a, "category": q["category"]}
                    for q, a in zip(questions, answers)]
        with open(out, "w") as f:
            json.dump({"data": data, "checkpoint": checkpoint_dir, "results": table, "seconds": seconds,
                       "examples": examples[:200]}, f, indent=1)
        print(f"wrote {out}")
    return 0
