"""Ahead-of-time compiles for TPU topologies on this CPU machine (``tokenflow-jax compile``).

The compile tests need libtpu (``pip install 'jax[tpu]==0.10.2'``) and are skipped without it. The t2i train
step is cheap to compile (seconds); the tokenizer step (VGG16 LPIPS + teacher, CNNs, discriminator) and the
sampler (every scale unrolled, the tokenizer's decoder) take minutes on 2 cores, so they carry the slow marker.
"""
import argparse
import importlib.util
import math
import os
import re

import numpy as np
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # before libtpu loads: parallel test processes

from tokenflow_jax import config as config_lib  # noqa: E402
from tokenflow_jax.apps import compile as aot
from tokenflow_jax.apps import topology
from tokenflow_jax.recipes.tokenizer import frozen

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs jax[tpu] (libtpu)")
GIB = 2**30


@pytest.fixture(autouse=True)
def default_matmul_precision():
    """Compile as the command does: conftest's 'highest' (float32 references) would make XLA:TPU emit multi-pass
    bf16 matmuls, which compile several times slower and need more memory than a real run."""
    import jax

    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", None)
    yield
    jax.config.update("jax_default_matmul_precision", previous)


# ------------------------------------------------------------------------------------------ topology names
@pytest.mark.parametrize("name,libtpu_name,chip_config,wrap,chips", [
    ("v5p-256", "v5:4x4x8", "megacore", (True, True, True), 128),
    ("v5p-64", "v5:2x4x4", "megacore", (False, False, False), 32),
    ("v5e-256", "v5e:16x16", None, (True, True, False), 256),
    ("v5litepod-16", "v5e:4x4", None, (False, False, False), 16),
    ("v6e-64", "v6e:8x8", None, (False, False, False), 64),
    ("v4-32", "v4:2x2x4", "megacore", (False, False, False), 16),
    ("v5:4x4x8", "v5:4x4x8", "megacore", (False, False, False), 128),
])
def test_user_names_map_to_libtpu_topologies(name, libtpu_name, chip_config, wrap, chips):
    tpu = topology.parse(name)
    assert (tpu.topology_name, tpu.chip_config_name, tpu.wrap, tpu.num_chips) == (libtpu_name, chip_config, wrap, chips)


def test_unknown_topology_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown TPU topology 'v5p-300'; known names: .*v5p-256"):
        topology.parse("v5p-300")
    args = argparse.Namespace(config="configs/t2i.py:tiny", topology="v9-8", num_slices=1, json=None)
    assert aot.main(args, []) == 2


def test_abstract_frozen_weights_match_the_loaded_ones():
    """The compile path builds the teacher + LPIPS weights abstractly; they must be what training loads."""
    import jax

    from tokenflow_jax.recipes.tokenizer import train as trainer

    config = config_lib.load_config("configs/tokenizer.py:tiny")
    parts = trainer.build_parts(config)
    loaded = trainer.load_frozen_params(config, parts)
    abstract = trainer.abstract_frozen_params(config, parts)
    assert jax.tree.structure(loaded) == jax.tree.structure(abstract)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(abstract)):
        assert (tuple(np.shape(a)), np.asarray(a).dtype) == (tuple(b.shape), b.dtype)


# ---------------------------------------------------------------------------------------------- compiles
def compile_report(spec, name, overrides=(), num_slices=1):
    config = config_lib.load_config(spec)
    config_lib.apply_overrides(config, list(overrides))
    return aot.compile_config(config, topology.parse(name, num_slices))


def check_fits(report, devices, mesh):
    assert report["fits"], report
    assert report["num_devices"] == devices and report["mesh"] == mesh
    for p in report["programs"]:
        assert 0 < p["peak_bytes"] < report["hbm_bytes_per_device"]
        assert p["flops_per_device"] > 0
        if "state_bytes" in p:
            assert p["argument_bytes"] >= p["state_bytes"] > 0


def t2i_state_bytes(spec="configs/t2i.py:tiny"):
    """Hand count: float32 parameters + AdamW's two moments, whole (as on a data-parallel mesh)."""
    import jax

    from tokenflow_jax.models import t2i
    from tokenflow_jax.recipes.t2i import setup as t2i_setup

    config = config_lib.load_config(spec)
    cfg = t2i_setup.model_config(config, frozen.tokenizer_config(config))
    text = jax.ShapeDtypeStruct((1, cfg.text_length), np.int32)
    codes = jax.ShapeDtypeStruct((1, cfg.num_tokens, cfg.code_dim), np.float32)
    params = jax.eval_shape(t2i.NextScaleT2I(cfg).init, jax.random.key(0), text, text, codes)
    return 3 * sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(params))


@needs_libtpu
@pytest.mark.parametrize("name,devices", [("v5e-4", 4), ("v5p-8", 4)])
def test_t2i_tiny_train_step_compiles(name, devices):
    report = compile_report("configs/t2i.py:tiny", name)
    check_fits(report, devices, {"data": devices, "fsdp": 1, "tensor": 1})
    (step,) = report["programs"]
    assert step["name"] == "train_step"
    # params and both Adam moments, float32, replicated (tiny is data parallel), + a few scalar counters
    assert 0 <= step["state_bytes"] - t2i_state_bytes() < 64
    assert step["loop_trip_counts"] == [4, 4]  # the scanned decoder, forward and backward
    text = aot.format_report(report)
    assert f"mesh: data={devices} fsdp=1 tensor=1" in text and "XLA FLOPs per step" in text and "\nfits" in text


@needs_libtpu
def test_fsdp_mesh_and_two_slices():
    report = compile_report("configs/t2i.py:tiny", "v5e-4", ["mesh.shape=(1, -1, 1)"])
    check_fits(report, 4, {"data": 1, "fsdp": 4, "tensor": 1})
    sharded = report["programs"][0]["state_bytes"]
    assert sharded < t2i_state_bytes() / 3  # the state is sharded four ways (biases and norms are not)
    report = compile_report("configs/t2i.py:tiny", "v5e-4", [], num_slices=2)
    check_fits(report, 8, {"data": 8, "fsdp": 1, "tensor": 1})


@needs_libtpu
def test_an_oversized_config_fails_with_a_clear_message(capsys):
    overrides = ["--config.model.llm.width=8192", "--config.model.llm.mlp_dim=32768",
                 "--config.model.llm.num_heads=64", "--config.model.llm.num_kv_heads=8"]
    args = argparse.Namespace(config="configs/t2i.py:tiny", topology="v5e-4", num_slices=1, json=None)
    assert aot.main(args, overrides) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "\ndoes NOT fit" in captured.out
    err = captured.err
    # The figure is the TPU compiler's own (it moves with the step's program; ~70 GiB for this width).
    needed = re.search(r"error: configs/t2i.py:tiny does not fit on v5e-4: train_step needs at least ([0-9.]+) GiB "
                       r"per device", err)
    assert needed and 40 < float(needed.group(1)) < 100, err
    assert "a TPU v5 lite device has 15.75 GiB usable" in err and "RESOURCE_EXHAUSTED" in err
    assert "--config.mesh.shape" in err


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("name,devices", [("v5e-4", 4), ("v4-8", 4)])
def test_tokenizer_tiny_train_step_compiles(name, devices):
    report = compile_report("configs/tokenizer.py:tiny", name)
    check_fits(report, devices, {"data": devices, "fsdp": 1, "tensor": 1})
    print(aot.format_report(report))


@needs_libtpu
@pytest.mark.slow
def test_sample_tiny_compiles():
    report = compile_report("configs/sample.py:tiny", "v5p-8")
    check_fits(report, 4, {"data": 4, "fsdp": 1, "tensor": 1})
    assert [p["name"] for p in report["programs"]] == ["sample"]
    print(aot.format_report(report))
