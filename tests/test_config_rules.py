"""Every numeric field of every config has a range, checked when the config is built: a value out of it is one
line naming the field; the structural checks between fields; the VLM schedule follows train.num_steps."""
import os

import pytest

from tokenflow_jax import config as config_lib
from tokenflow_jax import config_rules
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.train import optim

# Every variant each config's docstring lists (and their options that add or change fields).
VARIANTS = (
    "configs/tokenizer.py:tiny", "configs/tokenizer.py:b", "configs/tokenizer.py:b,res=256,enhanced",
    "configs/tokenizer.py:xl", "configs/tokenizer.py:b,res=256,enhanced,stage2",
    "configs/t2i.py:tiny", "configs/t2i.py:1b", "configs/t2i.py:7b,head=separate",
    "configs/sample.py:tiny", "configs/sample.py:7b", "configs/sample.py:1b,preset=official_script",
    "configs/sample.py:tiny,loops=3",
    "configs/vlm.py:tiny", "configs/vlm.py:vicuna13b", "configs/vlm.py:qwen14b,stage=1",
    "configs/unified.py:tiny", "configs/unified.py:7b", "configs/unified.py:14b",
    "configs/demo.py",
    "configs/ablations.py:w_dis", "configs/ablations.py:codebook_size", "configs/ablations.py:mapping",
    "configs/ablations.py:scales", "configs/ablations.py:smoke",
)


def test_every_config_file_is_listed_here():
    listed = {spec.partition(":")[0] for spec in VARIANTS}
    assert listed == {f"configs/{name}" for name in os.listdir("configs") if name.endswith(".py")}


@pytest.mark.parametrize("spec", VARIANTS)
def test_every_numeric_field_has_a_rule_and_the_defaults_pass_it(spec):
    config = config_lib.build_config(spec)  # checks every rule
    assert config_rules.unruled(config) == [], "add a rule to config_rules.RULES for these fields"


def _bad_values(rule: config_rules.Range, value):
    """Values of ``value``'s type (a number or a sequence of them) that ``rule`` rejects: just past each bound."""
    sample = value[0] if isinstance(value, (tuple, list)) else value
    cast = int if isinstance(sample, int) else float
    step = 1 if cast is int else 0.5
    if rule.choices:
        numbers = [max(rule.choices) + 1, min(rule.choices) - 1]
    else:
        numbers = []
        if rule.low is not None:
            numbers.append(rule.low if rule.low_open else rule.low - step)
        if rule.high is not None:
            numbers.append(rule.high if rule.high_open else rule.high + step)
    bad = [cast(n) for n in numbers if n not in rule.also]
    assert bad, rule
    if isinstance(value, (tuple, list)):
        return [type(value)((b, *value[1:])) for b in bad]
    return bad


@pytest.mark.parametrize("spec", VARIANTS)
def test_each_numeric_field_out_of_range_is_one_line_naming_it(spec):
    fields = list(config_rules.numeric_fields(config_lib.load_config(spec)))
    assert len(fields) > 8
    for path, value in fields:
        for bad in _bad_values(config_rules.rule_for(path), value):
            with pytest.raises(ConfigError) as raised:
                config_lib.build_config(spec, [f"--config.{path}={bad!r}"])
            message = str(raised.value)
            assert f"config.{path}=" in message and "\n" not in message, (path, bad, message)


def test_the_cases_a_tester_found_name_the_field_and_what_is_expected():
    cases = {
        "quantizer.codebook_size=0": "config.quantizer.codebook_size=0: must be >= 1",
        "quantizer.codebook_size=-5": "config.quantizer.codebook_size=-5: must be >= 1",
        "train.log_every=0": "config.train.log_every=0: must be >= 1",
        "train.checkpoint_every=0": "config.train.checkpoint_every=0: must be >= 1",
        "train.keep_checkpoints=0": "config.train.keep_checkpoints=0: must be >= 1",
        "train.num_steps=-5": "config.train.num_steps=-5: must be >= 1",
        "train.global_batch_size=-8": "config.train.global_batch_size=-8: must be >= 1",
        "optim.lr=0.0": "config.optim.lr=0.0: must be > 0",
        "quantizer.scale_drop_prob=1.5": "config.quantizer.scale_drop_prob=1.5: must be in [0, 1]",
        "optim.b2=1.0": "config.optim.b2=1.0: must be in [0, 1)",
        "teacher.stride=2": "config.teacher.stride=2: must be one of 4, 8, 16",
        "quantizer.scales=(1, 4, 2, 8)": "must be strictly increasing",
        "mesh.shape=(0, 1, 1)": "config.mesh.shape=(0, 1, 1): entry 0 (0) must be >= 1 (or -1)",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[")):
            config_lib.build_config("configs/tokenizer.py:tiny", [f"--config.{override}"])


def test_a_derived_field_is_named_beside_the_one_it_follows():
    with pytest.raises(ConfigError) as raised:
        config_lib.build_config("configs/vlm.py:tiny", ["--config.train.num_steps=0"])
    assert "config.train.num_steps=0: must be >= 1" in str(raised.value)
    assert "config.optim.decay_steps=0" in str(raised.value)


def test_skip_budget_has_a_rule_wherever_a_data_section_puts_it():
    for path in ("data.skip_budget", "data.t2i.skip_budget", "data.vlm.skip_budget"):
        rule = config_rules.rule_for(path)
        assert rule is not None and rule.allows(1) and rule.allows(4) and not rule.allows(0) and not rule.allows(-1)


@pytest.mark.parametrize("spec, override, expected", [
    ("configs/tokenizer.py:tiny", "model.pixel_encoder.num_groups=12",
     r"config.model.pixel_encoder.num_groups=12 must divide every channel count of this CNN \(ch x ch_mult: "
     r"\[32, 64, 128\]\)"),
    ("configs/tokenizer.py:tiny", "model.pixel_decoder.ch=20",
     r"config.model.pixel_decoder.num_groups=8 must divide .* \[20, 40, 80\]\); \[20\] do not split"),
    ("configs/tokenizer.py:tiny", "model.image_size=72", "gives a 9x9 patch grid, but config.quantizer.scales="),
    ("configs/tokenizer.py:tiny", "model.semantic_encoder.patch_size=16", "gives a 4x4 patch grid"),
    ("configs/tokenizer.py:xl", "model.semantic_encoder.pos_grid=24",
     "semantic_encoder.pos_grid=24 must be the patch grid 27: a SigLIP tower"),
    ("configs/tokenizer.py:xl", "model.pixel_resolution=384", "pixel_resolution .* 384 must be 27 x 16"),
    ("configs/tokenizer.py:tiny", "model.semantic_encoder.num_heads=3",
     "config.model.semantic_encoder.width=64 must be a multiple of config.model.semantic_encoder.num_heads=3"),
    ("configs/vlm.py:tiny", "model.llm.num_kv_heads=3", "num_heads=4 must be a multiple of .*num_kv_heads=3"),
    ("configs/vlm.py:tiny", "generate.max_new_tokens=256", "leaves no room for a prompt"),
    ("configs/vlm.py:tiny", "optim.warmup_steps=1501", "decay_steps=1500 must be >= .*warmup_steps=1501"),
    ("configs/t2i.py:tiny", "mesh.shape=(-1, -1, 1)", "at most one entry may be -1"),
    ("configs/t2i.py:tiny", "mesh.shape=(-1, 1)", "one entry per axis"),
])
def test_structural_checks_name_the_fields(spec, override, expected):
    with pytest.raises(ConfigError, match=expected):
        config_lib.build_config(spec, [f"--config.{override}"])


def test_the_vlm_schedule_follows_train_num_steps():
    config = config_lib.build_config("configs/vlm.py:tiny", ["--config.train.num_steps=100"])
    assert (config.optim.decay_steps, config.optim.warmup_steps) == (100, 3)  # 3% warmup, rounded up
    schedule = optim.learning_rate_schedule(config.optim)
    lr = config.optim.lr
    assert float(schedule(3)) == pytest.approx(lr) and float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    assert float(schedule(75)) < lr / 4  # three quarters into a 100-step cosine (1,500 steps: still ~lr)
    default = config_lib.build_config("configs/vlm.py:tiny")
    assert (default.optim.decay_steps, default.optim.warmup_steps) == (1500, 45)
    # An explicit value replaces the derived one alone; train.num_steps keeps its own.
    pinned = config_lib.build_config("configs/vlm.py:tiny", ["--config.optim.decay_steps=400",
                                                             "--config.train.num_steps=200"])
    assert (pinned.optim.decay_steps, pinned.optim.warmup_steps, pinned.train.num_steps) == (400, 6, 200)
    # One step: one warmup step and nothing left to decay, which is still a schedule.
    one = config_lib.build_config("configs/vlm.py:tiny", ["--config.train.num_steps=1"])
    assert (one.optim.decay_steps, one.optim.warmup_steps) == (1, 1)
    assert [float(optim.learning_rate_schedule(one.optim)(s)) for s in (0, 1, 5)] == [0.0, 0.0, 0.0]


def test_a_cosine_tokenizer_schedule_decays_over_its_run():
    # Both optimisers (generator and discriminator) follow train.num_steps unless decay_steps is set.
    config = config_lib.build_config("configs/tokenizer.py:tiny", [
        "--config.train.num_steps=200", "--config.optim.schedule=cosine", "--config.optim.warmup_steps=10"])
    assert (config.optim.decay_steps, config.disc_optim.decay_steps) == (200, 200)
    schedule = optim.learning_rate_schedule(config.optim)
    assert float(schedule(10)) == pytest.approx(config.optim.lr)
    assert float(schedule(105)) == pytest.approx(config.optim.lr / 2, rel=1e-3)  # halfway through the decay
    assert float(schedule(200)) == pytest.approx(0.0, abs=1e-12)
    # The constant default ignores the cosine fields.
    default = optim.learning_rate_schedule(config_lib.build_config("configs/tokenizer.py:tiny").optim)
    assert float(default(0)) == float(default(10_000)) == pytest.approx(1e-3)
