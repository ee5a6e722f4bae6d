"""A study's table, JSON and plots are built from the points' own files: known numbers written into fake point
folders come out in their cells, a missing stage leaves a point pending, and the plots are real PNGs."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tokenflow_jax import config as config_lib
from tokenflow_jax.apps import ablation_report


def _write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f)


def fake_point(directory, psnr, codes, perplexities, seconds, temp_bytes, vqa, stages, shapes=None,
               semantic_codes=None):
    scales = ("scale_1", "scale_2", "scale_4")
    tokenizer_eval = {
        "psnr": psnr, "ssim": 0.5, "lpips": 0.25, "semantic_cosine": 0.75, "codebook_usage": 0.125,
        "codes_used_per_scale": dict(zip(scales, codes)),
        "codebook_perplexity_per_scale": dict(zip(scales, perplexities)),
        "codebook_usage_per_scale": dict(zip(scales, (0.1, 0.2, 0.3)))}
    if semantic_codes is not None:  # what tokenizer evaluation adds under quantizer.mapping='separate'
        tokenizer_eval.update(semantic_codebook_usage=0.0625, semantic_codes_used_per_scale=dict(zip(scales,
                                                                                                     semantic_codes)))
    _write(os.path.join(directory, "tokenizer_eval.json"), tokenizer_eval)
    _write(os.path.join(directory, "step_cost.json"), {
        "seconds_per_step": seconds, "temp_bytes": temp_bytes, "argument_bytes": 3 * 2**20,
        "codebook_state_bytes": 2**20, "beyond_codebook_bytes": temp_bytes + 2 * 2**20})
    _write(os.path.join(directory, "vqa_eval.json"), {"results": {"overall": {"accuracy": vqa, "chance": 0.324}}})
    if shapes is not None:
        row = lambda x: {"overall": x, "categories": {}}  # noqa: E731
        _write(os.path.join(directory, "shapes_eval.json"), {
            "strategies": {"1-step": row(shapes[0]), "3-step": row(shapes[1])}, "chance": row(0.117)})
    for stage in stages:
        _write(os.path.join(directory, "stages", f"{stage}.json"), {"done": True, "seconds": 1.0})


@pytest.fixture
def study(tmp_path):
    config = config_lib.build_config("configs/ablations.py:smoke")
    config.stages = ("tokenizer", "tokenizer_eval", "step_cost", "vqa")
    fake_point(str(tmp_path / "points" / "w_dis=0"), 21.25, (1, 3, 9), (1.0, 2.5, 7.25), 0.5, 40 * 2**20, 0.5,
               config.stages, shapes=(0.25, 0.375))
    # The second point's VQA stage has not finished: its record is missing, it shows as pending.
    fake_point(str(tmp_path / "points" / "w_dis=1"), 23.5, (2, 4, 16), (2.0, 3.5, 12.75), 0.25, 48 * 2**20, 0.625,
               config.stages[:-1], semantic_codes=(1, 2, 5))
    return config, str(tmp_path)


def test_table_cells_are_the_files_numbers(study):
    config, workdir = study
    written = ablation_report.write(config, workdir)
    assert written["done"] == 1
    text = open(written["markdown"]).read()
    assert ("| point | PSNR (dB) | LPIPS | semantic cos | codes used (all scales) | codes used per scale | "
            "perplexity per scale | semantic index: codes used | semantic index: codes used per scale | "
            "ShapesEval 1-step | ShapesEval 3-step | Shapes-VQA | s / step | "
            "step arguments (MB) | step temporaries (MB) | codebook + its state (MB) | "
            "beyond the codebook (MB) |") in text
    assert ("| w_dis=0 | 21.25 | 0.2500 | 0.7500 | 12.5% | 1 / 3 / 9 | 1.0 / 2.5 / 7.2 |  |  | 25.0% | 37.5% | "
            "50.0% | 0.500 | 3.0 | 40.0 | 1.0 | 42.0 |") in text
    # Columns a point's files lack stay empty (no ShapesEval for the second point, no semantic index for the first).
    assert ("| w_dis=1 (pending) | 23.50 | 0.2500 | 0.7500 | 12.5% | 2 / 4 / 16 | 2.0 / 3.5 / 12.8 | 6.2% | "
            "1 / 2 / 5 |  |  | 62.5% | 0.250 | 3.0 | 48.0 | 1.0 | 50.0 |") in text
    assert "Chance levels: ShapesEval 11.7%, Shapes-VQA 32.4%." in text
    assert "![smoke](smoke.png)" in text and "`--config.quantizer.w_dis=1.0`" in text

    results = json.load(open(written["json"]))
    first, second = results["points"]
    assert first["done"] and not second["done"]
    assert first["metrics"]["psnr"] == 21.25 and second["metrics"]["temp_mb"] == 48.0
    assert first["metrics"]["perplexity_per_scale"] == {"scale_1": 1.0, "scale_2": 2.5, "scale_4": 7.25}
    assert first["x"] == 0.0 and first["sources"] == ["tokenizer_eval.json", "step_cost.json", "shapes_eval.json",
                                                      "vqa_eval.json"]


def test_plots_are_written_from_the_points(study):
    config, workdir = study
    written = ablation_report.write(config, workdir)
    assert [os.path.basename(p) for p in written["plots"]] == ["smoke.png", "smoke_per_scale.png"]
    for path in written["plots"]:
        image = np.asarray(Image.open(path))
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 5  # drawn, not blank


def test_a_study_without_finished_files_still_writes_a_pending_table(tmp_path):
    config = config_lib.build_config("configs/ablations.py:mapping")
    written = ablation_report.write(config, str(tmp_path))
    text = open(written["markdown"]).read()
    assert written["plots"] == [] and written["done"] == 0
    assert "| shared (pending) |" in text and "| separate (pending) |" in text and "0 of 3 points done" in text


def test_docs_page_gathers_each_study_with_its_plots(study, tmp_path):
    config, workdir = study
    ablation_report.write(config, workdir)
    out = tmp_path / "docs" / "ablations.md"
    os.makedirs(out.parent)
    page = ablation_report.docs([workdir], str(out))
    assert out.read_text() == page
    assert "## Study `smoke` (shapes world)" in page and "| w_dis=0 | 21.25 |" in page
    assert "![smoke](ablations/smoke.png)" in page
    assert (tmp_path / "docs" / "ablations" / "smoke_per_scale.png").stat().st_size > 1000
    # A hand-written reading of the study goes under its heading and survives regeneration.
    (tmp_path / "docs" / "ablations" / "smoke.notes.md").write_text("What it shows.\n")
    page = ablation_report.docs([workdir], str(out))
    heading = page.index("## Study `smoke` (shapes world)")
    assert heading < page.index("What it shows.") < page.index("| w_dis=0 | 21.25 |")


def test_docs_page_keeps_the_studies_it_is_not_given(study, tmp_path):
    config, workdir = study
    ablation_report.write(config, workdir)
    out = tmp_path / "ablations.md"
    out.write_text(ablation_report.HEADER[0] + "\n\n## Study `scales` (shapes world)\n\nKept as written.\n\n"
                   "## Study `smoke` (shapes world)\n\nAn older run.\n\n"
                   "## Study `mapping` (shapes world)\n\nAlso kept.\n")
    page = ablation_report.docs([workdir], str(out))
    assert "Kept as written." in page and "Also kept." in page and "An older run." not in page
    # The given study replaced its own section in place; the others kept their order around it.
    assert page.index("Kept as written.") < page.index("| w_dis=0 | 21.25 |") < page.index("Also kept.")
    assert page.count("## Study `smoke`") == 1 and page.count("# Ablations on the shapes world") == 1
