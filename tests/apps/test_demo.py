"""The quick-start demo end to end at toy sizes: every stage runs through the real recipes, the report holds
each figure with its chance level, an interrupted run continues without redoing finished stages, and the
terminal table is printed. (The full-size demo's figures are in the README; it takes ~25 min.)

The toy run compiles every stage's programs (~4-7 min on a 2-core machine), so its tests are in the slow tier; the
fast tier checks the stage bookkeeping with stand-in stages, and each stage's recipe has its own fast tests
(tests/recipes), as does the sweep, which runs the same stages (tests/apps/test_sweep.py)."""
import json
import os

import pytest

from tokenflow_jax import config as config_lib
from tokenflow_jax.apps import demo, demo_report
from tokenflow_jax.train import loop

TOY = [
    "tokenizer.num_steps=3", "tokenizer.checkpoint_every=3", "tokenizer_eval.num_images=16",
    "tokenizer_eval.batch_size=8", "tokenizer_eval.grid_images=4", "tokenize.num_images=64",
    "t2i.num_steps=3", "t2i.checkpoint_every=3", "shapes_eval.num_per_category=1", "shapes_eval.grid_prompts=2",
    "shapes_eval.per_prompt=2", "vlm.num_steps=3", "vlm.checkpoint_every=3", "vqa.num_per_category=2",
    "t2i.overrides=('--config.train.log_every=1',)", "vlm.overrides=('--config.train.log_every=1',)",
]


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    """A toy demo run interrupted at its last stage, then run again to the end: (workdir, first exit code,
    the stage records after the first run, captured output of the second)."""
    workdir = str(tmp_path_factory.mktemp("demo"))
    config = config_lib.build_config("configs/demo.py", TOY)
    real_vqa = demo.STAGES[-1]

    def interrupted(*_):
        raise KeyboardInterrupt

    demo.STAGES = (*demo.STAGES[:-1], demo.Stage(real_vqa.name, real_vqa.description, interrupted))
    try:
        first = demo.run(config, workdir)
    finally:
        demo.STAGES = (*demo.STAGES[:-1], real_vqa)
    after_first = {s.name: demo.load_record(workdir, s.name) for s in demo.STAGES}
    second = demo.run(config, workdir)
    assert second == 0
    return workdir, first, after_first


@pytest.mark.slow
def test_an_interrupted_demo_continues_where_it_stopped(toy_demo):
    workdir, first, after_first = toy_demo
    assert first == 130
    assert all(after_first[s.name]["done"] for s in demo.STAGES[:-1])
    assert not after_first["vqa"]["done"]
    for s in demo.STAGES[:-1]:  # finished stages were not run again: their records are unchanged
        assert demo.load_record(workdir, s.name) == after_first[s.name], s.name
    assert demo.load_record(workdir, "vqa")["done"]


@pytest.mark.slow
def test_every_stage_ran_its_recipe(toy_demo):
    workdir = toy_demo[0]
    from tokenflow_jax import checkpoint

    for name in ("tokenizer", "t2i", "vlm"):
        assert checkpoint.latest_step(os.path.join(workdir, name, "checkpoints")) == 3, name
    assert json.load(open(os.path.join(workdir, "tokens", "manifest.json")))
    for name in ("reconstructions.png", "samples.png", "tokenizer_eval.json", "shapes_eval.json", "vqa_eval.json"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    # The t2i and VLM runs read the demo's tokenizer, not a fresh random one.
    t2i_meta = checkpoint.read_meta(os.path.join(workdir, "t2i", "checkpoints"))
    assert demo.tokenizer_checkpoint(workdir) in json.dumps(t2i_meta)


@pytest.mark.slow
def test_report_gives_each_figure_with_its_chance_level(toy_demo):
    workdir = toy_demo[0]
    records = {s.name: demo.load_record(workdir, s.name) for s in demo.STAGES}
    report = open(os.path.join(workdir, "report.md")).read()
    shapes, vqa = records["shapes_eval"]["results"], records["vqa"]["results"]["results"]
    for heading in ("## Stages", "## Tokenizer", "## Text-to-image: ShapesEval", "## Understanding: Shapes-VQA"):
        assert heading in report
    assert "![samples](samples.png)" in report and "![reconstructions](reconstructions.png)" in report
    assert f"{records['tokenizer_eval']['results']['psnr']:.2f} dB" in report
    overall = [shapes["strategies"][s]["overall"] for s in ("1-step", "3-step")] + [
        shapes["chance"]["overall"], shapes["ceiling"]["overall"]]
    assert "| **overall** | " + " | ".join(f"**{100 * x:.1f}%**" for x in overall) + " |" in report
    assert (f"| **overall** | {vqa['overall']['n']} | **{100 * vqa['overall']['accuracy']:.1f}%** | "
            f"{100 * vqa['overall']['chance']:.1f}% |") in report
    table = demo_report.terminal_table(records)
    assert "Shapes-VQA overall" in table and "time: total" in table
    total = sum(r["seconds"] for r in records.values())
    assert demo_report.total_seconds(records) == pytest.approx(total) and total > 0


@pytest.mark.parametrize("stop, exit_code", [(loop.Stopped(2, 3, loop.EXIT_STOPPED), 143),
                                             (loop.Stopped(2, 3, 130), 130), (KeyboardInterrupt(), 130)])
def test_a_stopped_stage_exits_with_its_code_and_keeps_the_finished_ones(tmp_path, monkeypatch, capsys, stop,
                                                                         exit_code):
    """A trainer stopped by SIGTERM (a preemption notice) raises loop.Stopped(143): the demo returns 143, so a retry
    loop runs it again; Ctrl-C is 130. The finished stage stays done, the stopped one is left to continue."""

    def stopped(*_):
        raise stop

    monkeypatch.setattr(demo, "STAGES", (demo.Stage("first", "finishes", lambda *_: {"x": 1.0}),
                                         demo.Stage("second", "is stopped", stopped)))
    assert demo.run(config_lib.ConfigDict(), str(tmp_path)) == exit_code
    assert demo.load_record(str(tmp_path), "first")["done"] and not demo.load_record(str(tmp_path), "second")["done"]
    assert "stopped in stage 'second'" in capsys.readouterr().out


def test_a_rerun_runs_only_the_unfinished_stages_and_keeps_their_time(tmp_path, monkeypatch):
    """Stand-in stages: the first run finishes 'first' and is stopped in 'second'; the rerun calls 'second' and
    'third' only, adds the stopped attempt's seconds to 'second', and writes the report from all three records."""
    calls = []

    def stage(name, fail=None):
        def run(*_):
            calls.append(name)
            if fail and fail():
                raise KeyboardInterrupt
            return {"name": name}
        return demo.Stage(name, name, run)

    second_fails = iter([True, False])
    monkeypatch.setattr(demo, "STAGES", (stage("first"), stage("second", lambda: next(second_fails)),
                                         stage("third")))
    monkeypatch.setattr(demo_report, "markdown", lambda records, _: "report of " + ",".join(records))
    monkeypatch.setattr(demo_report, "terminal_table", lambda records: "")
    workdir = str(tmp_path)
    assert demo.run(config_lib.ConfigDict(), workdir) == 130
    stopped_seconds = demo.load_record(workdir, "second")["seconds"]
    assert calls == ["first", "second"] and stopped_seconds >= 0
    first_record = demo.load_record(workdir, "first")
    assert demo.run(config_lib.ConfigDict(), workdir) == 0
    assert calls == ["first", "second", "second", "third"]
    assert demo.load_record(workdir, "first") == first_record
    second = demo.load_record(workdir, "second")
    assert second["done"] and second["seconds"] >= stopped_seconds
    assert demo.load_record(workdir, "third")["results"] == {"name": "third"}
    assert open(os.path.join(workdir, "report.md")).read() == "report of first,second,third"
