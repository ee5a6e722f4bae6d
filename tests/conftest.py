"""Shared test set-up: 8 fake CPU devices, a (data, fsdp, tensor) = (2, 2, 2) mesh, parsed absl flags.

XLA_FLAGS must be set before jax is imported anywhere, so this file sets it at import time.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# 8 device threads share 2 cores: under load one thread can fall > 40 s (XLA:CPU's default) behind the
# others in a step, and XLA then aborts at the next collective. 600 s tolerates that, yet a genuine
# collective deadlock (XLA:CPU can starve when independent collectives run concurrently on fake devices)
# still fails the run within minutes instead of hanging CI.
if "collective_call_terminate" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=600"
                                " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120")
# The suite is dominated by XLA:CPU compiles of small programs run for a few steps, and LLVM's optimisation
# passes are most of each compile: at level 0 without the expensive passes a trainer test compiles ~2x
# faster, while the tiny arrays it runs on barely notice slower code. Only the code generator changes, not
# the HLO (same fusions, same operations, no fast-math either way): results can differ from default builds
# by float rounding at most, and every comparison in a test runs under the same flags. Set
# TOKENFLOW_TEST_FULL_LLVM_OPT=1 to test with XLA's default optimisation instead.
if not os.environ.get("TOKENFLOW_TEST_FULL_LLVM_OPT"):
    for flag in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
        if flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
            os.environ["XLA_FLAGS"] += " " + flag
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gc  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Tests compare against float32 references; never let a test run in reduced matmul precision.
jax.config.update("jax_default_matmul_precision", "highest")
# Trainer tests compile the same step several times (fresh closures per run): the persistent cache
# turns the repeats into reloads, within a session and across CI runs on the same machine.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update(
        "jax_compilation_cache_dir",
        os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tokenflow_jax", "jax_tests"),
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# Tracing a train step allocates millions of short-lived Python objects (tracers, equations, avals), and at
# CPython's default thresholds (700, 10, 10) that sets off a full collection over the whole heap (jax, torch,
# transformers and every module they import) every few hundred thousand allocations: ~12% of a trainer test's
# process time in a profile, ~25% of its tracing. Rarer collections over a heap whose imports are frozen out of
# them (pytest_collection_finish) trace the same programs ~1.3x faster; TOKENFLOW_TEST_DEFAULT_GC=1 restores
# CPython's defaults. Garbage in reference cycles is still collected, only in larger batches.
if not os.environ.get("TOKENFLOW_TEST_DEFAULT_GC"):
    gc.set_threshold(50_000, 50, 20)


def pytest_configure(config):
    # grain worker processes read absl flags; they must be marked parsed first.
    flags.FLAGS.mark_as_parsed()


def pytest_collection_finish(session):
    if not os.environ.get("TOKENFLOW_TEST_DEFAULT_GC"):
        gc.collect()
        gc.freeze()  # the imported modules and collected tests: never garbage, never scanned again


@pytest.fixture(scope="session")
def mesh222():
    """The (data, fsdp, tensor) = (2, 2, 2) mesh over the 8 fake CPU devices."""
    from tokenflow_jax import parallel

    assert jax.device_count() == 8, "tests need 8 fake CPU devices (XLA_FLAGS set too late?)"
    return parallel.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def broken_folder(tmp_path):
    """(root, files) for a flat folder of ``tests.data.helpers.broken_folder_files``, plus a caption for
    a_good.png."""
    from tests.data.helpers import broken_folder_files

    root = tmp_path / "images"
    root.mkdir()
    files = broken_folder_files()
    for name, (data, *_) in files.items():
        (root / name).write_bytes(data)
    (root / "a_good.txt").write_text("a red rectangle\n")
    return os.fspath(root), files


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jit caches after each test module: compiled executables and their constants otherwise
    accumulate over the whole session (one process reached ~10 GiB), and with two xdist workers on a 24 GiB
    machine that is the difference between fitting and not. Modules share nothing compiled with each other
    except through the persistent cache, which this does not touch."""
    yield
    jax.clear_caches()


# The longest files first (worker-seconds of a cold-cache run, longest first). `launch/test.sh` hands whole files to
# two pytest-xdist workers in collection order (--dist loadfile); a long file that starts last leaves the other
# worker idle at the end. Only the order changes; a file missing from the list keeps its place after these.
LONGEST_FILES = (
    "tests/recipes/tokenizer/test_train.py",
    "tests/recipes/unified/test_serve.py",
    "tests/recipes/vlm/test_train.py",
    "tests/recipes/unified/test_train.py",
    "tests/recipes/t2i/test_train.py",
    "tests/recipes/t2i/test_sample.py",
    "tests/recipes/tokenizer/test_evaluate.py",
    "tests/recipes/tokenizer/test_tokenize.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: others keep their order
