"""One process of the multi-process tests (tests/test_multihost.py); not a test module itself.

    python -m tests.multihost_worker train RECIPE WORKDIR STEPS --devices 4 [--skip N]   (+ TOKENFLOW_* env)
    python -m tests.multihost_worker heartbeat --devices 1                                (+ TOKENFLOW_* env)

``train`` runs the real trainer (``tokenflow_jax.train.<recipe>.train``) on a reduced ``tiny`` config over a
(data=8) mesh of all processes' devices. Every process reads its own rows of one global stream (the
single-process pipeline's batches, process p taking rows [p * B/P, (p + 1) * B/P)), so a run with any number of
processes sees the same global batches, and losses can be compared across process counts. ``--skip N`` starts
the stream at batch N (a resumed run whose data position could not be restored). The multi-host set-up is
``tokenflow_jax.distributed.initialize`` from the environment, as the CLI does.

``heartbeat`` joins the processes, then runs a small cross-process reduction every 0.2 s until killed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

TOKENIZER = [
    "model.image_size=32", "data.image_size=32", "model.semantic_encoder.pos_grid=4",
    "model.semantic_decoder.pos_grid=4", "quantizer.scales=(1, 2, 4)", "quantizer.codebook_size=256",
    "train.preview_images=4", "train.image_every=1", "data.num_examples=64", "loss.disc_start=0",
]
T2I = [
    "model.llm.width=64", "model.llm.depth=2", "model.llm.num_heads=4", "model.llm.num_kv_heads=2",
    "model.llm.mlp_dim=128", "data.num_examples=64", "train.cond_drop_rate=0.0",
    # the frozen tokenizer that encodes images online: the reduced one above
    "tokenizer.overrides=" + repr(["model.image_size=32", "data.image_size=32", "model.semantic_encoder.pos_grid=4",
                                   "model.semantic_decoder.pos_grid=4", "quantizer.scales=(1, 2, 4)",
                                   "quantizer.codebook_size=256"]),
]
COMMON = ["mesh.shape=(-1, 1, 1)", "train.global_batch_size=8", "train.log_every=1", "train.checkpoint_every=1000",
          "train.async_checkpoints=False", "optim.lr=1e-3"]


def _environment(devices: int) -> None:
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices}"
                               " --xla_cpu_collective_call_terminate_timeout_seconds=600")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _global_stream(make_dataset, skip: int):
    """``pipeline.make_dataset`` replaced: this process's rows of the one-process stream, from batch ``skip``."""
    import jax

    def make(config_data, *, global_batch_size, process_index, process_count, seed, train):
        del process_index, process_count  # every process builds the same global stream ...
        dataset = make_dataset(config_data, global_batch_size=global_batch_size, process_index=0, process_count=1,
                               seed=seed, train=train)
        rows = global_batch_size // jax.process_count()
        first = jax.process_index() * rows

        def mine(batch):  # ... and keeps its rows of it
            return {k: v[first:first + rows] for k, v in batch.items()}

        class Skipping:
            def __iter__(self):
                iterator = iter(dataset.map(mine))
                for _ in range(skip):
                    next(iterator)
                return iterator

        return Skipping()

    return make


def train(args) -> int:
    import jax
    from absl import flags

    from tokenflow_jax import config as config_lib
    from tokenflow_jax import distributed

    distributed.initialize()
    jax.config.update("jax_default_matmul_precision", "highest")
    flags.FLAGS.mark_as_parsed()
    from tokenflow_jax.data import pipeline

    pipeline.make_dataset = _global_stream(pipeline.make_dataset, args.skip)
    module = f"tokenflow_jax.recipes.{args.recipe}.train"
    config = config_lib.load_config(f"configs/{args.recipe}.py:tiny")
    config_lib.apply_overrides(config, COMMON + (TOKENIZER if args.recipe == "tokenizer" else T2I)
                           + [f"train.num_steps={args.steps}"])
    import importlib

    start = time.time()
    importlib.import_module(module).train(config, args.workdir)
    print(f"process {jax.process_index()} of {jax.process_count()}: {args.recipe} done in {time.time() - start:.1f} s",
          flush=True)
    return 0


def heartbeat(args) -> int:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from tokenflow_jax import distributed, parallel

    distributed.initialize()
    mesh = parallel.make_mesh((jax.device_count(),), ("data",))
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))
    rows = np.ones((jax.local_device_count(), 4), np.float32)
    for step in range(100_000):
        value = float(total(jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), rows)))
        if step == 0:
            print(f"ready {jax.process_index()} {value}", flush=True)
        time.sleep(0.2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("recipe", choices=("tokenizer", "t2i"))
    p.add_argument("workdir")
    p.add_argument("steps", type=int)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--skip", type=int, default=0)
    p = sub.add_parser("heartbeat")
    p.add_argument("--devices", type=int, required=True)
    args = parser.parse_args(argv)
    _environment(args.devices)
    return train(args) if args.command == "train" else heartbeat(args)


if __name__ == "__main__":
    sys.exit(main())
