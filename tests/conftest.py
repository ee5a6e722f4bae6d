"""Shared test set-up: 8 fake CPU devices, a (data, fsdp, tensor) = (2, 2, 2) mesh, parsed absl flags.

XLA_FLAGS must be set before jax is imported anywhere, so this file sets it at import time.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Tests compare against float32 references; never let a test run in reduced matmul precision.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    # grain worker processes read absl flags; they must be marked parsed first.
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def mesh222():
    """The (data, fsdp, tensor) = (2, 2, 2) mesh over the 8 fake CPU devices."""
    from tokenflow_jax import parallel

    assert jax.device_count() == 8, "tests need 8 fake CPU devices (XLA_FLAGS set too late?)"
    return parallel.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
