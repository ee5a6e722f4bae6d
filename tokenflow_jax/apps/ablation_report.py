"""A study's results from its points' own files: ``DIR/results.json``, ``DIR/results.md`` (a table) and PNG plots.

Every number comes from a file a point's run wrote (``DIR/points/<name>/``): ``tokenizer_eval.json`` (PSNR, LPIPS,
semantic cosine, codes used and perplexity per scale), ``step_cost.json`` (seconds per step, the step's compiled
memory), ``shapes_eval.json`` (ShapesEval per sampling strategy) and ``vqa_eval.json`` (Shapes-VQA); a point counts
as done when every stage of the study has its record in ``stages/``. Nothing is typed in by hand, and a point that
is not finished shows as pending. :func:`write` is what ``tokenflow-jax sweep`` calls at the end of every run.

``docs/ablations.md`` from finished studies (their tables, plots copied to ``docs/ablations/``)::

    python -m tokenflow_jax.apps.ablation_report --docs docs/ablations.md out/w_dis out/codebook_size ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MB = 2**20


def _read(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def point_metrics(directory: str) -> tuple[dict[str, Any], list[str]]:
    """(metrics, the files they came from) of one point's folder; metrics a file does not hold are absent."""
    metrics: dict[str, Any] = {}
    sources = []
    tok = _read(os.path.join(directory, "tokenizer_eval.json"))
    if tok is not None:
        sources.append("tokenizer_eval.json")
        # semantic_*: under quantizer.mapping='separate' the semantic index is a second token with its own statistics.
        for key in ("psnr", "ssim", "lpips", "semantic_cosine", "codebook_usage", "codebook_perplexity",
                    "semantic_codebook_usage"):
            if key in tok:
                metrics[key] = float(tok[key])
        for prefix in ("", "semantic_"):
            for key, name in (("codes_used_per_scale", "codes_used"), ("codebook_perplexity_per_scale", "perplexity"),
                              ("codebook_usage_per_scale", "usage")):
                if prefix + key in tok:
                    metrics[f"{prefix}{name}_per_scale"] = {k: float(v) for k, v in tok[prefix + key].items()}
    cost = _read(os.path.join(directory, "step_cost.json"))
    if cost is not None:
        sources.append("step_cost.json")
        metrics["seconds_per_step"] = float(cost["seconds_per_step"])
        for key in ("temp_bytes", "argument_bytes", "codebook_state_bytes", "beyond_codebook_bytes"):
            metrics[key.replace("_bytes", "_mb")] = cost[key] / MB
    shapes = _read(os.path.join(directory, "shapes_eval.json"))
    if shapes is not None:
        sources.append("shapes_eval.json")
        for name, row in shapes["strategies"].items():
            metrics[f"shapes_eval {name}"] = float(row["overall"])
        metrics["shapes_eval chance"] = float(shapes["chance"]["overall"])
    vqa = _read(os.path.join(directory, "vqa_eval.json"))
    if vqa is not None:
        sources.append("vqa_eval.json")
        metrics["vqa"] = float(vqa["results"]["overall"]["accuracy"])
        metrics["vqa chance"] = float(vqa["results"]["overall"]["chance"])
    return metrics, sources


def collect(config, workdir: str) -> dict[str, Any]:
    """The study's results: for every point its name, x, series, overrides, whether every stage is done, its
    metrics and the files they were read from."""
    points = []
    for name, overrides, x, series in config.points:
        directory = os.path.join(workdir, "points", str(name))
        metrics, sources = point_metrics(directory)
        done = all((_read(os.path.join(directory, "stages", f"{stage}.json")) or {}).get("done", False)
                   for stage in config.stages)
        points.append({"name": str(name), "x": x, "series": str(series), "overrides": list(overrides), "done": done,
                       "metrics": metrics, "sources": sources})
    return {"study": str(config.study), "stages": list(config.stages), "points": points}


# ------------------------------------------------------------------------------------------------- the table

def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _per_scale(fmt: str) -> Callable[[dict[str, float]], str]:
    return lambda d: " / ".join(format(v, fmt) for v in d.values())


# (metric key, column heading, format). A column appears when some point has the metric.
COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("psnr", "PSNR (dB)", lambda v: f"{v:.2f}"),
    ("lpips", "LPIPS", lambda v: f"{v:.4f}"),
    ("semantic_cosine", "semantic cos", lambda v: f"{v:.4f}"),
    ("codebook_usage", "codes used (all scales)", _pct),
    ("codes_used_per_scale", "codes used per scale", _per_scale(".0f")),
    ("perplexity_per_scale", "perplexity per scale", _per_scale(".1f")),
    ("semantic_codebook_usage", "semantic index: codes used", _pct),
    ("semantic_codes_used_per_scale", "semantic index: codes used per scale", _per_scale(".0f")),
    ("shapes_eval 1-step", "ShapesEval 1-step", _pct),
    ("shapes_eval 3-step", "ShapesEval 3-step", _pct),
    ("vqa", "Shapes-VQA", _pct),
    ("seconds_per_step", "s / step", lambda v: f"{v:.3f}"),
    ("argument_mb", "step arguments (MB)", lambda v: f"{v:.1f}"),
    ("temp_mb", "step temporaries (MB)", lambda v: f"{v:.1f}"),
    ("codebook_state_mb", "codebook + its state (MB)", lambda v: f"{v:.1f}"),
    ("beyond_codebook_mb", "beyond the codebook (MB)", lambda v: f"{v:.1f}"),
)

NOTES = {
    "mapping": "Under separate argmins a position has two tokens: the usage and perplexity columns count the pixel "
               "index (the token the t2i model generates and the pixel decoder reads), the 'semantic index' "
               "columns the semantic one (what the VLM's features fetch).",
    "scales": "The single-scale tokenizer is not a next-scale model, so no text-to-image model is trained on it: "
              "the study reports reconstruction and understanding only.",
    "codebook_size": "Memory is XLA's compiled memory analysis of the train step, per device: arguments are the "
                     "parameters, optimiser state, frozen networks and batch; temporaries everything else the step "
                     "allocates; 'beyond the codebook' is both minus the codebooks and what scales with them "
                     "(their Adam moments or EMA sums, usage ages and counts).",
}


def table(results: dict[str, Any]) -> list[str]:
    columns = [c for c in COLUMNS if any(c[0] in p["metrics"] for p in results["points"])]
    lines = ["| point | " + " | ".join(c[1] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for p in results["points"]:
        name = p["name"] if p["done"] else f"{p['name']} (pending)"
        cells = [fmt(p["metrics"][key]) if key in p["metrics"] else "" for key, _, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    study = results["study"]
    first = next((p for p in results["points"] if p["metrics"]), None)
    out = [f"# Study `{study}` (shapes world)", "",
           f"`tokenflow-jax sweep --config configs/ablations.py:{study} --workdir DIR`; "
           f"{sum(p['done'] for p in results['points'])} of {len(results['points'])} points done. "
           "Per-scale cells list the scales from the coarsest to the final grid.", "", *table(results), ""]
    if first is not None:
        chances = [f"{label} {_pct(first['metrics'][key])}" for key, label in
                   (("shapes_eval chance", "ShapesEval"), ("vqa chance", "Shapes-VQA")) if key in first["metrics"]]
        if chances:
            out += ["Chance levels: " + ", ".join(chances) + ".", ""]
    if study in NOTES:
        out += [NOTES[study], ""]
    out += [f"![{os.path.splitext(name)[0]}]({name})" for name in plots]
    out += ["", "Points and their tokenizer overrides:", ""]
    out += [f"- `{p['name']}`: " + " ".join(f"`{o}`" for o in p["overrides"]) for p in results["points"]]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------- the plots

PLOTTED = ("psnr", "lpips", "semantic_cosine", "shapes_eval 1-step", "shapes_eval 3-step", "vqa", "seconds_per_step",
           "temp_mb", "beyond_codebook_mb")


def _save(figure: Figure, path: str) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_metrics(results: dict[str, Any], path: str) -> bool:
    """One panel per metric over the points: lines over x per series (dashed levels for points without x), or
    bars when no point has an x. False (nothing written) when no point has a plotted metric."""
    labels = dict((key, label) for key, label, _ in COLUMNS)
    points = [p for p in results["points"] if p["metrics"]]
    keys = [k for k in PLOTTED if any(k in p["metrics"] for p in points)]
    if not keys:
        return False
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    figure = Figure(figsize=(4.2 * cols, 3.2 * rows))
    numeric = any(p["x"] is not None for p in points)
    xs = [p["x"] for p in points if p["x"] is not None]
    for n, key in enumerate(keys):
        ax = figure.add_subplot(rows, cols, n + 1)
        have = [p for p in points if key in p["metrics"]]
        if numeric:
            for series in dict.fromkeys(p["series"] for p in have):
                line = sorted((p["x"], p["metrics"][key]) for p in have if p["series"] == series and p["x"] is not None)
                if line:
                    ax.plot(*zip(*line), marker="o", label=series)
            for p in have:
                if p["x"] is None:
                    ax.axhline(p["metrics"][key], linestyle="--", color="grey", label=p["series"])
            if min(xs) > 0:
                ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs) else 10)
            else:
                ax.set_xscale("symlog", linthresh=min([x for x in xs if x > 0], default=1.0))
        else:
            ax.bar(range(len(have)), [p["metrics"][key] for p in have])
            ax.set_xticks(range(len(have)), [p["name"] for p in have], rotation=20, fontsize=8)
        ax.set_title(labels[key], fontsize=10)
        if numeric and n == 0:
            ax.legend(fontsize=7)
    _save(figure, path)
    return True


def plot_per_scale(results: dict[str, Any], path: str) -> bool:
    """Codes used and perplexity at each scale, one line per point. False when no point has them."""
    points = [p for p in results["points"] if "codes_used_per_scale" in p["metrics"]]
    if not points:
        return False
    figure = Figure(figsize=(9, 3.4))
    for n, (key, title) in enumerate((("codes_used_per_scale", "codes used per scale"),
                                      ("perplexity_per_scale", "perplexity per scale"))):
        ax = figure.add_subplot(1, 2, n + 1)
        for p in points:
            if key in p["metrics"]:
                scales = [int(s.removeprefix("scale_")) for s in p["metrics"][key]]
                ax.plot(scales, list(p["metrics"][key].values()), marker="o", label=p["name"])
        ax.set_yscale("log")
        ax.set_xlabel("scale (grid side)")
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    _save(figure, path)
    return True


def write(config, workdir: str) -> dict[str, Any]:
    """Writes ``results.json``, the plots and ``results.md`` into ``workdir``; returns their paths and the number of
    finished points."""
    results = collect(config, workdir)
    plots = []
    for suffix, plot in (("", plot_metrics), ("_per_scale", plot_per_scale)):
        name = f"{results['study']}{suffix}.png"
        if plot(results, os.path.join(workdir, name)):
            plots.append(name)
    paths = {"json": os.path.join(workdir, "results.json"), "markdown": os.path.join(workdir, "results.md")}
    for key, text in (("json", json.dumps(results, indent=1)), ("markdown", markdown(results, plots))):
        with open(paths[key] + ".tmp", "w") as f:
            f.write(text)
        os.replace(paths[key] + ".tmp", paths[key])
    return {**paths, "plots": [os.path.join(workdir, p) for p in plots],
            "done": int(np.sum([p["done"] for p in results["points"]]))}


HEADER = ["# Ablations on the shapes world", "",
          "Each section is a study of configs/ablations.py as `tokenflow-jax sweep` wrote it: the table and plots "
          "come from the points' own result files (shapes-world numbers, not ImageNet).", ""]


def _sections(page: str) -> dict[str, str]:
    """The study sections of an existing docs page by study name, in page order (each from its ``## Study`` heading
    to the next one)."""
    sections: dict[str, str] = {}
    lines = page.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("## Study `")]
    for n, start in enumerate(starts):
        study = lines[start].split("`")[1]
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        sections[study] = "\n".join(lines[start:end]).rstrip("\n")
    return sections


def docs(study_dirs: Sequence[str], out: str) -> str:
    """One markdown page from the ``results.md`` of each study folder (their headings one level down), the plots
    copied beside it into ``<out without .md>/``; returns the text written to ``out``. A hand-written reading of a
    study, ``<out without .md>/<study>.notes.md`` (what it shows, where it disagrees with the paper), goes under its
    heading if it exists: the numbers stay generated, the interpretation is kept apart so a regeneration keeps it.

    If ``out`` exists, the sections of studies not given are kept as they are, in their place, and a given study
    replaces its own section or is appended: studies run on different machines (or days) join one page without
    every study's folder at hand."""
    assets = os.path.splitext(out)[0]
    os.makedirs(assets, exist_ok=True)
    sections = {}
    if os.path.isfile(out):
        with open(out) as f:
            sections = _sections(f.read())
    for directory in study_dirs:
        with open(os.path.join(directory, "results.json")) as f:
            study = json.load(f)["study"]
        with open(os.path.join(directory, "results.md")) as f:
            text = f.read()
        for name in sorted(os.listdir(directory)):
            if name.endswith(".png") and name.startswith(study):
                shutil.copyfile(os.path.join(directory, name), os.path.join(assets, name))
                text = text.replace(f"]({name})", f"]({os.path.basename(assets)}/{name})")
        lines = ["#" + line if line.startswith("#") else line for line in text.splitlines()]
        notes = os.path.join(assets, f"{study}.notes.md")
        if os.path.isfile(notes):
            with open(notes) as f:
                lines[1:1] = ["", f.read().strip()]  # under the study's heading, before its table
        sections[study] = "\n".join(lines).rstrip("\n")
    page = "\n".join(HEADER + [part for section in sections.values() for part in (section, "")])
    with open(out, "w") as f:
        f.write(page)
    return page


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", required=True, help="the page to write, e.g. docs/ablations.md")
    parser.add_argument("studies", nargs="+", help="sweep workdirs (each with results.json and results.md)")
    args = parser.parse_args(argv)
    docs(args.studies, args.docs)
    print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
