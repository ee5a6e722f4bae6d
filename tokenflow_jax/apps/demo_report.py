"""The demo's report: ``DIR/report.md`` and the terminal table, from the stage records of
:mod:`tokenflow_jax.apps.demo`.

``records`` maps a stage name to ``{"done": bool, "seconds": float, "results": {...}}`` as the demo saved it.
Every accuracy is shown next to its chance level, defined where it is computed:

  * ShapesEval chance: each prompt scored on the tokenizer's reconstruction of *another* prompt's scene of
    the same category (a generator drawing good images that ignore the text); ceiling: on the reconstruction
    of the prompt's own scene (a perfect generator with this tokenizer).
  * Shapes-VQA chance: always answering the most frequent answer of the question's category.
  * Tokenizer PSNR yardstick: the plain background image as the "reconstruction".
"""
from __future__ import annotations

import os
import platform
from typing import Any

import jax

from tokenflow_jax.shapes import detector as shapes_eval

STAGE_TITLES = {
    "tokenizer": "tokenizer training", "tokenizer_eval": "tokenizer evaluation", "tokenize": "tokenize the set",
    "t2i": "text-to-image training", "shapes_eval": "ShapesEval + samples", "vlm": "VLM training",
    "vqa": "Shapes-VQA evaluation",
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _throughput(name: str, r: dict[str, Any]) -> str:
    if name in ("tokenizer", "t2i"):
        return f"{r['images_per_second']:.1f} images/s ({r['steps']} steps x {r['global_batch_size']})"
    if name == "vlm":
        return (f"{r['tokens_per_second']:.0f} tokens/s, {r['examples_per_second']:.1f} examples/s "
                f"({r['steps']} steps x {r['global_batch_size']})")
    if name == "tokenize":
        return f"{r['images_per_s']:.0f} images/s ({r['records']} images, {r['tokens_per_image']} tokens each)"
    if name == "shapes_eval":
        return ", ".join(f"{s}: {v:.1f} images/s" for s, v in r["images_per_second"].items())
    if name == "vqa":
        return f"{r['questions_per_second']:.1f} questions/s"
    if name == "tokenizer_eval":
        return f"{r['num_images']} images"
    return ""


def total_seconds(records: dict[str, dict[str, Any]]) -> float:
    return sum(r["seconds"] for r in records.values())


def markdown(records: dict[str, dict[str, Any]], demo) -> str:

    res = {name: r.get("results", {}) for name, r in records.items()}
    tok, se, vqa = res["tokenizer_eval"], res["shapes_eval"], res["vqa"]["results"]
    strategies = list(se["strategies"])
    lines = [
        "# TokenFlow demo report", "",
        f"The whole system on the built-in shapes data: `tiny` tokenizer, text-to-image model and VLM, trained "
        f"from scratch on {jax.device_count()} {jax.default_backend().upper()} device(s) of a {os.cpu_count()}-core "
        f"{platform.machine()} machine. Total wall time **{_minutes(total_seconds(records))}**.", "",
        "## Stages", "", "| stage | wall time | throughput |", "|---|---:|---|",
    ]
    lines += [f"| {STAGE_TITLES[n]} | {_minutes(r['seconds'])} | {_throughput(n, r['results'])} |"
              for n, r in records.items()]
    lines += [f"| **total** | **{_minutes(total_seconds(records))}** | |", ""]

    usage = ", ".join(f"{k.removeprefix('scale_')}x{k.removeprefix('scale_')}: {_pct(v)}"
                      for k, v in tok["codebook_usage_per_scale"].items())
    lines += [
        "## Tokenizer", "",
        f"{tok['num_images']} held-out scenes (the validation split), reconstructions through the shared-mapping "
        f"multi-scale quantiser. Semantic teacher: {tok['teacher']}.", "",
        "| metric | value | yardstick |", "|---|---:|---|",
        f"| PSNR | {tok['psnr']:.2f} dB | {tok['background_psnr']:.2f} dB for the plain background image |",
        f"| SSIM | {tok['ssim']:.3f} | 1 = identical |",
        f"| LPIPS (VGG16) | {tok['lpips']:.3f} | 0 = identical |",
        f"| codebook usage | {_pct(tok['codebook_usage'])} of {tok['codebook_size']} | per scale: {usage} |", "",
        "Held-out scenes (top) and their reconstructions (bottom):", "", "![reconstructions](reconstructions.png)", "",
    ]

    lines += [
        "## Text-to-image: ShapesEval", "",
        f"{se['num_prompts']} prompts ({se['num_prompts'] // len(shapes_eval.CATEGORIES)} per GenEval category), one "
        "image each, scored by the exact shapes detector. *Chance*: each prompt scored on the tokenizer's "
        "reconstruction of another prompt's scene of the same category (good images that ignore the text). "
        "*Ceiling*: on the reconstruction of the prompt's own scene (a perfect generator with this tokenizer).", "",
        "| category | " + " | ".join(strategies) + " | chance | ceiling |", "|---|" + "---:|" * (len(strategies) + 2),
    ]
    for c in [*shapes_eval.CATEGORIES, "overall"]:
        cells = [se["strategies"][s][c] for s in strategies] + [se["chance"][c], se["ceiling"][c]]
        bold = "**" if c == "overall" else ""
        lines.append(f"| {bold}{c}{bold} | " + " | ".join(f"{bold}{_pct(x)}{bold}" for x in cells) + " |")
    lines += ["", f"Samples for held-out prompts ({strategies[-1]} sampling), one row per prompt:", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(se["sample_prompts"])]
    lines += ["", "![samples](samples.png)", ""]

    lines += [
        "## Understanding: Shapes-VQA", "",
        "Questions about held-out scenes, greedy answers, exact match. *Chance*: always giving the category's most "
        "frequent answer.", "", "| category | questions | accuracy | chance |", "|---|---:|---:|---:|",
    ]
    for c, row in vqa.items():
        bold = "**" if c == "overall" else ""
        lines.append(f"| {bold}{c}{bold} | {row['n']} | {bold}{_pct(row['accuracy'])}{bold} | {_pct(row['chance'])} |")
    lines += ["", "| question | answer | model |", "|---|---|---|"]
    lines += [f"| {e['question']} | {e['answer']} | {e['prediction']} |" for e in res["vqa"]["examples"]]
    lines += ["", "## Settings (`configs/demo.py` with this run's overrides)", "", "```", demo.to_json(indent=1), "```",
              ""]
    return "\n".join(lines)


def terminal_table(records: dict[str, dict[str, Any]]) -> str:
    res = {name: r.get("results", {}) for name, r in records.items()}
    tok, se, vqa = res["tokenizer_eval"], res["shapes_eval"], res["vqa"]["results"]
    rows = [("figure", "value", "chance / yardstick"),
            ("tokenizer PSNR", f"{tok['psnr']:.2f} dB", f"{tok['background_psnr']:.2f} dB (plain background)"),
            ("tokenizer LPIPS (VGG16)", f"{tok['lpips']:.3f}", "0 = identical"),
            ("codebook usage", _pct(tok["codebook_usage"]), f"of {tok['codebook_size']} codes")]
    rows += [(f"ShapesEval overall, {s}", _pct(v["overall"]),
              f"{_pct(se['chance']['overall'])} chance, {_pct(se['ceiling']['overall'])} ceiling")
             for s, v in se["strategies"].items()]
    rows += [("Shapes-VQA overall", _pct(vqa["overall"]["accuracy"]), f"{_pct(vqa['overall']['chance'])} chance")]
    rows += [(f"time: {STAGE_TITLES[n]}", _minutes(r["seconds"]), _throughput(n, r["results"]))
             for n, r in records.items()]
    rows += [("time: total", _minutes(total_seconds(records)), "")]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    out = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}" for a, b, c in rows]
    out.insert(1, "-" * (sum(widths) + 4))
    return "\n".join(out)
