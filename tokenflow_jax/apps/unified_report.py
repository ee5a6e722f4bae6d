"""One unified model against the two separate ones, on the shapes world: ``comparison.md`` from the runs' own files.

    python -m tokenflow_jax.apps.unified_report --demo out/demo --unified out/unified_tiny

Reads the demo's ShapesEval and Shapes-VQA results (``DEMO/shapes_eval.json``, ``DEMO/vqa_eval.json``: the separate
`tiny` t2i model and VLM) and the unified run's (``UNIFIED/shapes_eval.json`` from ``eval-shapes --rerank N``,
``UNIFIED/vqa_eval.json``), with the runs' step counts and batch sizes from their ``metrics.jsonl`` and
checkpoint records, and writes ``UNIFIED/comparison.md``: ShapesEval (1- and 3-step, per category) and Shapes-VQA
(per category) side by side with chance and ceiling, then the reranking table. No figure is typed in by hand.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from tokenflow_jax import checkpoint
from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import InputNotFoundError
from tokenflow_jax.shapes import detector as shapes_eval


def _read(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path} does not exist: run the stage that writes it first")
    with open(path) as f:
        return json.load(f)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _examples(run_dir: str, batch_fields: tuple[str, ...]) -> tuple[int, dict[str, int]]:
    """(steps, {field: per-step batch, "lr": peak learning rate, "schedule": its shape}) of the training run in
    ``run_dir``, from its recorded config."""
    meta = checkpoint.read_meta(os.path.join(run_dir, "checkpoints"))
    config = config_lib.build_config(meta["config_spec"], list(meta.get("config_overrides", [])))
    return int(config.train.num_steps), {**{f: int(config.train[f]) for f in batch_fields},
                                         "lr": float(config.optim.lr), "schedule": str(config.optim.schedule)}


def shapes_table(separate: dict[str, Any], unified: dict[str, Any]) -> list[str]:
    strategies = ("1-step", "3-step")
    head = ["category"] + [f"{who} {s}" for s in strategies for who in ("separate", "unified")] + ["chance", "ceiling"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    def cell(results, name, category):
        row = results[name] if name in ("chance", "ceiling") else results["strategies"][name]
        return row["overall"] if category == "overall" else row["categories"][category]["accuracy"]

    for category in [*shapes_eval.CATEGORIES, "overall"]:
        cells = [cell(r, s, category) for s in strategies for r in (separate, unified)]
        cells += [cell(separate, "chance", category), cell(separate, "ceiling", category)]
        bold = "**" if category == "overall" else ""
        lines.append(f"| {bold}{category}{bold} | " + " | ".join(f"{bold}{_pct(c)}{bold}" for c in cells) + " |")
    return lines


def vqa_table(separate: dict[str, Any], unified: dict[str, Any]) -> list[str]:
    lines = ["| category | questions | separate VLM | unified | chance |", "|---|---:|---:|---:|---:|"]
    for category, row in separate["results"].items():
        bold = "**" if category == "overall" else ""
        lines.append(f"| {bold}{category}{bold} | {row['n']} | {bold}{_pct(row['accuracy'])}{bold} | "
                     f"{bold}{_pct(unified['results'][category]['accuracy'])}{bold} | {_pct(row['chance'])} |")
    return lines


def rerank_table(unified: dict[str, Any]) -> list[str]:
    names = [n for n in unified["strategies"] if ", " in n]
    if not names:
        return []
    lines = ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for category in [*shapes_eval.CATEGORIES, "overall"]:
        rows = [unified["strategies"][n] for n in names]
        values = [r["overall"] if category == "overall" else r["categories"][category]["accuracy"] for r in rows]
        bold = "**" if category == "overall" else ""
        lines.append(f"| {bold}{category}{bold} | " + " | ".join(f"{bold}{_pct(v)}{bold}" for v in values) + " |")
    return lines


def markdown(demo_dir: str, unified_dir: str) -> str:
    separate_shapes, separate_vqa = (_read(os.path.join(demo_dir, f)) for f in ("shapes_eval.json", "vqa_eval.json"))
    unified_shapes, unified_vqa = (_read(os.path.join(unified_dir, f)) for f in ("shapes_eval.json", "vqa_eval.json"))
    t2i_steps, t2i_batch = _examples(os.path.join(demo_dir, "t2i"), ("global_batch_size",))
    vlm_steps, vlm_batch = _examples(os.path.join(demo_dir, "vlm"), ("global_batch_size",))
    steps, batches = _examples(os.path.join(unified_dir, "train"), ("t2i_batch_size", "vlm_batch_size"))
    out = [
        "# One unified model against two separate ones (shapes world)", "",
        f"Separate: the demo's `tiny` t2i model ({t2i_steps} steps x {t2i_batch['global_batch_size']} captioned "
        f"images = {t2i_steps * t2i_batch['global_batch_size']:,}; lr {t2i_batch['lr']:g} {t2i_batch['schedule']}) "
        f"and `tiny` VLM ({vlm_steps} steps x {vlm_batch['global_batch_size']} conversations = "
        f"{vlm_steps * vlm_batch['global_batch_size']:,}; lr {vlm_batch['lr']:g} {vlm_batch['schedule']}). "
        f"Unified: one `tiny` decoder, {steps} steps of {batches['t2i_batch_size']} captioned images + "
        f"{batches['vlm_batch_size']} conversations ({steps * batches['t2i_batch_size']:,} and "
        f"{steps * batches['vlm_batch_size']:,}; lr {batches['lr']:g} {batches['schedule']}). Same tokenizer, "
        "token shards and evaluation sets.", "",
        f"## ShapesEval ({separate_shapes['num_prompts']} prompts, one image each)", "",
        *shapes_table(separate_shapes, unified_shapes), "",
        "## Shapes-VQA (greedy answers, exact match)", "", *vqa_table(separate_vqa, unified_vqa), "",
    ]
    rerank = rerank_table(unified_shapes)
    if rerank:
        out += ["## Self-judged generation (`eval-shapes --rerank N`, the unified model only)", "",
                "Each prompt gets N candidates; *mean of N*: the expected score of keeping any one of them; *best of "
                "N by the model*: the one with the highest log p(prompt | image) under the model's own understanding "
                "half; *best of N by the detector*: what a perfect judge would reach.", "", *rerank, ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="the demo's workdir (separate t2i model and VLM)")
    parser.add_argument("--unified", required=True, help="the unified run's folder (launch/unified_tiny.sh's OUT)")
    args = parser.parse_args(argv)
    text = markdown(args.demo, args.unified)
    with open(os.path.join(args.unified, "comparison.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
