"""Child process of bench/quantizer.py: the codebook-sharded nearest-code search on fake CPU devices.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in the environment (the flag is read
when jax is imported, hence the separate process). Writes one table row as JSON to ``--out`` and the
indices to ``--out + '.npy'`` so the parent can compare them with its single-device search.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bench import common, quantizer  # noqa: E402
from tokenflow_jax.ops import nearest_code as nc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--mesh", default="1x8", help="DATAxCODEBOOK device grid; tokens split over DATA")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    common.enable_compile_cache()

    data, code = (int(s) for s in args.mesh.split("x"))
    if jax.device_count() < data * code:
        raise SystemExit(f"need {data * code} devices, have {jax.device_count()}: set XLA_FLAGS")
    # Mesh() defaults every axis to Auto, which the shard_map-based search needs (jax.make_mesh, in the jax
    # 0.10 this project pins, defaults to Explicit axes; see the JAX docs on explicit sharding).
    mesh = jax.sharding.Mesh(np.array(jax.devices()[: data * code]).reshape(data, code), ("data", "codebook"))
    z_sem, z_pix = quantizer.make_tokens(args.tokens)
    e_sem, e_pix = quantizer.make_codebooks(args.k)
    tokens = NamedSharding(mesh, P("data" if data > 1 else None, None))
    codes = NamedSharding(mesh, P("codebook", None))
    placed = (jax.device_put(z_sem, tokens), jax.device_put(z_pix, tokens),
              jax.device_put(e_sem, codes), jax.device_put(e_pix, codes))

    def search(z_s, z_p, e_s, e_p):
        return nc.nearest_code_sharded(z_s, z_p, e_s, e_p, codebook_axis="codebook",
                                       token_axes=("data",) if data > 1 else ())

    with jax.set_mesh(mesh):
        row, indices = quantizer.run_search("sharded", search, placed, args.quick, note=f"{args.mesh} fake devices",
                                            budget_MiB=nc.DEFAULT_MEMORY_BYTES // common.MiB,
                                            plan=quantizer.plan_text(args.tokens // data, args.k // code,
                                                                     nc.DEFAULT_MEMORY_BYTES))
    row["memory_note"] = "memory_analysis of an SPMD executable is per device"
    with open(args.out, "w") as f:
        json.dump(row, f, default=str)
    np.save(args.out + ".npy", indices)


if __name__ == "__main__":
    main()
