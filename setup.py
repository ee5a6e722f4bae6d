"""tokenflow_jax: JAX/Flax implementation of TokenFlow (arXiv 2412.03069).

Install order matters on CPU machines: install ``torch==2.13.0`` (the CPU build) *before* the
``test`` extra, or pip resolves a CUDA build with several GB of nvidia-* wheels.
``launch/setup_env.sh`` does this for you.
"""
from setuptools import find_packages, setup

# Every version is pinned: unpinned installs resolved to different orbax/transformers releases
# on different days (see shared ENV_NOTES.md), and checkpoint formats follow those versions.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml_collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",  # tfds needs it but does not declare it
    "array_record==0.8.6",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "sentencepiece==0.2.1",  # Llama prompts tokenised as the official (slow) tokenizer does
    "safetensors==0.8.0",
    "huggingface_hub==2.4.0",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "msgpack==1.2.4",  # the ArrayRecord record format (never pickle)
    "pillow==13.0.0",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow
    "etils[epath]==1.15.0",  # local and gs:// paths
    "ml_dtypes==0.6.0",  # bfloat16 weight files
    "scipy==1.17.1",  # FID's matrix square root, ShapesEval's connected components
    "scikit-image==0.26.0",  # the built-in sample photos of `reconstruct --images builtin`
]

EXTRAS = {
    # torch must already be installed as 2.13.0+cpu; the pin here keeps pip from upgrading it.
    # jax[tpu] brings libtpu, which also compiles for TPU topologies on CPU machines (`tokenflow-jax compile`
    # and tests/test_compile.py, which skip without it).
    "test": ["pytest==9.2.0", "torch==2.13.0", "ruff==0.17.6", "portpicker==1.6.0", "import-linter==2.16",
             "jax[tpu]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
    "gpu": ["jax[cuda12]==0.10.2"],
    "gcs": ["gcsfs==2026.10.1"],  # gs:// workdirs (orbax reaches GCS through etils.epath -> fsspec)
}

setup(
    name="tokenflow-jax",
    version="0.1.0",
    description="TokenFlow unified image tokenizer and downstream models in JAX/Flax",
    # configs/ ships inside the package as tokenflow_jax.bundled_configs (not as a top-level `configs`
    # package, a name other projects use too), so `--config configs/t2i.py:7b` works from any directory.
    packages=find_packages(include=["tokenflow_jax", "tokenflow_jax.*"]) + ["tokenflow_jax.bundled_configs"],
    package_dir={"tokenflow_jax.bundled_configs": "configs"},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["tokenflow-jax=tokenflow_jax.cli:main"]},
)
