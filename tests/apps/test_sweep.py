"""`tokenflow-jax sweep` on the smoke study (2 points): a sweep stopped in the middle of its second point's training
continues there (the first point is not run again, the trainer resumes from its checkpoint), the results are written
from the points' files, a changed point setting is refused, and the command's arguments are checked.

The default tier runs the sweep's own logic over cheap stand-in stages that write the files the real ones write (a
trainer's metrics.jsonl and checkpoint step, tokenizer_eval.json); the slow tier runs the demo's real stages, a few
steps each."""
import json
import os

import pytest

from tokenflow_jax import checkpoint, cli
from tokenflow_jax import config as config_lib
from tokenflow_jax.apps import demo, sweep
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.train import loop

STAGES = '--config.stages=("tokenizer", "tokenizer_eval")'  # the resumable stages; the rest are the demo's own


def smoke(*overrides):
    config = config_lib.build_config("configs/ablations.py:smoke", [STAGES, *overrides])
    # One device: the 8 fake devices of the test set-up only slow a 3-step run down on 2 cores.
    config.demo.tokenizer.overrides = (*config.demo.tokenizer.overrides, "--config.mesh.num_devices=1")
    return config


@pytest.fixture(scope="module")
def stopped_then_continued(tmp_path_factory):
    """The smoke sweep stopped (a preemption notice) after step 2 of the second point's tokenizer, then run again:
    (workdir, first exit code, stage records after the first run, the second point's logged steps)."""
    workdir = str(tmp_path_factory.mktemp("sweep"))
    config = smoke()
    real = checkpoint.TrainCheckpointer.reached_preemption

    def preempted(self, step):
        real(self, step)
        return step == 2 and "w_dis=1" in str(self.directory)

    checkpoint.TrainCheckpointer.reached_preemption = preempted
    try:
        first = sweep.run(config, workdir)
    finally:
        checkpoint.TrainCheckpointer.reached_preemption = real
    dirs = [sweep.point_dir(workdir, name) for name in sweep.point_names(config)]
    after_first = [{s: demo.load_record(d, s) for s in config.stages} for d in dirs]
    assert checkpoint.latest_step(os.path.join(dirs[1], "tokenizer", "checkpoints")) == 2
    assert not os.path.exists(os.path.join(workdir, "results.md"))
    assert sweep.run(config, workdir) == 0
    return workdir, first, after_first, config


@pytest.mark.slow
def test_a_stopped_sweep_continues_mid_training(stopped_then_continued):
    workdir, first, after_first, config = stopped_then_continued
    assert first == 143  # a preemption notice: the cluster's retry runs the same command again
    dirs = [sweep.point_dir(workdir, name) for name in sweep.point_names(config)]
    assert all(r["done"] for r in after_first[0].values()) and not after_first[1]["tokenizer"]["done"]
    for stage in config.stages:  # the finished point was not run again
        assert demo.load_record(dirs[0], stage) == after_first[0][stage]
    # The second point's trainer resumed at step 2: step 3 is logged once, steps 1-2 were not redone.
    steps = [json.loads(line)["step"] for line in open(os.path.join(dirs[1], "tokenizer", "metrics.jsonl"))]
    assert steps == [1, 2, 3]
    assert checkpoint.latest_step(os.path.join(dirs[1], "tokenizer", "checkpoints")) == 3
    assert all(demo.load_record(dirs[1], s)["done"] for s in config.stages)


@pytest.mark.slow
def test_results_come_from_the_points_files(stopped_then_continued):
    workdir, _, _, config = stopped_then_continued
    results = json.load(open(os.path.join(workdir, "results.json")))
    table = open(os.path.join(workdir, "results.md")).read()
    for point, name in zip(results["points"], sweep.point_names(config)):
        evaluation = json.load(open(os.path.join(sweep.point_dir(workdir, name), "tokenizer_eval.json")))
        assert point["done"] and point["metrics"]["psnr"] == evaluation["psnr"]
        assert point["metrics"]["codes_used_per_scale"] == evaluation["codes_used_per_scale"]
        assert f"| {name} | {evaluation['psnr']:.2f} | {evaluation['lpips']:.4f} | " \
               f"{evaluation['semantic_cosine']:.4f} |" in table
    # The two points differ in the mapping's weight, so their codes differ too.
    assert results["points"][0]["metrics"]["codes_used_per_scale"] != results["points"][1]["metrics"][
        "codes_used_per_scale"]
    assert os.path.isfile(os.path.join(workdir, "smoke.png"))


# ------------------------------------------------------------------------------------- stand-in stages (fast)

def _w_dis(demo_config) -> float:
    return float(next(o for o in demo_config.tokenizer.overrides if "w_dis" in o).split("=")[1])


def fake_stages(calls: list, stop_at: dict):
    """Stand-ins for the demo's tokenizer stages that write the files the real ones write. The trainer logs one
    metrics line per step and keeps its newest step as its checkpoint; it stops (like a preemption notice) at
    ``stop_at[w_dis]``, once. The evaluation writes ``tokenizer_eval.json`` with numbers that depend on w_dis."""

    def tokenizer(demo_config, workdir):
        w_dis, folder = _w_dis(demo_config), os.path.join(workdir, "tokenizer")
        calls.append(("tokenizer", w_dis))
        os.makedirs(folder, exist_ok=True)
        checkpoint_path = os.path.join(folder, "checkpoint_step")
        start = int(open(checkpoint_path).read()) if os.path.exists(checkpoint_path) else 0
        num_steps = int(demo_config.tokenizer.num_steps)
        for step in range(start + 1, num_steps + 1):
            with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
            with open(checkpoint_path, "w") as f:
                f.write(str(step))
            if stop_at.get(w_dis) == step:
                del stop_at[w_dis]
                raise loop.Stopped(step, num_steps, loop.EXIT_STOPPED)
        return {"steps": num_steps}

    def tokenizer_eval(demo_config, workdir):
        w_dis = _w_dis(demo_config)
        calls.append(("tokenizer_eval", w_dis))
        evaluation = {"psnr": 20.0 + w_dis, "lpips": 0.5 - 0.1 * w_dis, "semantic_cosine": 0.9 - 0.2 * w_dis,
                      "codes_used_per_scale": {"scale_1": 1.0, "scale_2": 3.0 + w_dis},
                      "codebook_perplexity_per_scale": {"scale_1": 1.0, "scale_2": 2.5 + w_dis}}
        with open(os.path.join(workdir, "tokenizer_eval.json"), "w") as f:
            json.dump(evaluation, f)
        return evaluation

    return {"tokenizer": demo.Stage("tokenizer", "stand-in trainer", tokenizer),
            "tokenizer_eval": demo.Stage("tokenizer_eval", "stand-in evaluation", tokenizer_eval)}


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
    """The smoke sweep over stand-in stages, stopped at step 2 of the second point's trainer, then run again:
    (workdir, first exit code, stage records after the first run, config, stage calls)."""
    workdir = str(tmp_path_factory.mktemp("fake_sweep"))
    config = smoke()
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "STAGES", fake_stages(calls, stop_at={1.0: 2}))
        first = sweep.run(config, workdir)
        dirs = [sweep.point_dir(workdir, name) for name in sweep.point_names(config)]
        after_first = [{s: demo.load_record(d, s) for s in config.stages} for d in dirs]
        assert not os.path.exists(os.path.join(workdir, "results.md"))
        assert sweep.run(config, workdir) == 0
    return workdir, first, after_first, config, calls


def test_a_stopped_sweep_continues_where_it_stopped(fake_sweep):
    workdir, first, after_first, config, calls = fake_sweep
    assert first == 143
    dirs = [sweep.point_dir(workdir, name) for name in sweep.point_names(config)]
    assert all(r["done"] for r in after_first[0].values()) and not after_first[1]["tokenizer"]["done"]
    # The finished point ran once; the stopped trainer was started again and its evaluation ran after it.
    assert calls == [("tokenizer", 0.0), ("tokenizer_eval", 0.0), ("tokenizer", 1.0), ("tokenizer", 1.0),
                     ("tokenizer_eval", 1.0)]
    for stage in config.stages:
        assert demo.load_record(dirs[0], stage) == after_first[0][stage]
    # Resumed at step 2 of 3: step 3 is logged once, steps 1-2 were not redone.
    steps = [json.loads(line)["step"] for line in open(os.path.join(dirs[1], "tokenizer", "metrics.jsonl"))]
    assert steps == [1, 2, 3]
    assert all(demo.load_record(d, s)["done"] for d in dirs for s in config.stages)


def test_the_table_comes_from_the_points_files(fake_sweep):
    workdir, _, _, config, _ = fake_sweep
    results = json.load(open(os.path.join(workdir, "results.json")))
    table = open(os.path.join(workdir, "results.md")).read()
    for point, name in zip(results["points"], sweep.point_names(config)):
        evaluation = json.load(open(os.path.join(sweep.point_dir(workdir, name), "tokenizer_eval.json")))
        assert point["done"] and point["sources"] == ["tokenizer_eval.json"]
        assert point["metrics"]["psnr"] == evaluation["psnr"]
        assert point["metrics"]["codes_used_per_scale"] == evaluation["codes_used_per_scale"]
        assert f"| {name} | {evaluation['psnr']:.2f} | {evaluation['lpips']:.4f} | " \
               f"{evaluation['semantic_cosine']:.4f} |" in table
    assert [p["metrics"]["psnr"] for p in results["points"]] == [20.0, 21.0]
    assert os.path.isfile(os.path.join(workdir, "smoke.png"))


def test_a_point_run_with_other_settings_is_refused(fake_sweep):
    workdir = fake_sweep[0]
    changed = smoke("--config.demo.tokenizer.num_steps=4")
    with pytest.raises(ConfigError, match=r"holds point 'w_dis=0' run with other settings \(demo differ"):
        sweep.run(changed, workdir, point=0)


def test_command_line_checks(tmp_path, capsys):
    assert cli.main(["sweep", "--config", "configs/ablations.py:smoke", "--workdir", str(tmp_path), "--point",
                     "2"]) == 2
    assert "--point 2: study 'smoke' has 2 points, 0 to 1" in capsys.readouterr().err
    assert cli.main(["sweep", "--config", "configs/ablations.py:nope", "--workdir", str(tmp_path)]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err
    assert cli.main(["sweep", "--config", "configs/demo.py", "--workdir", str(tmp_path)]) == 2
    assert "sweep takes a study" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="config.stages names unknown stages"):
        sweep.run(smoke('--config.stages=("tokenizer", "fid")'), str(tmp_path))
