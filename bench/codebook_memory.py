"""The tokenizer train step's compiled memory against the codebook size K (issue: the 1M-code points must train on
the machine that trains the 1k ones).

Compiles (does not run) the demo's tokenizer train step (``configs/demo.py``'s `tiny`: no discriminator, AlexNet
LPIPS, the VGG16 teacher at stride 4, pixel CNNs at width 16, batch 8, one device) at each K, with the codebook loss
(Adam on the codebooks) and with the EMA update, and prints XLA's memory analysis: arguments (parameters, optimiser
state, frozen networks, the batch) and temporaries (everything else), with the temporaries' growth over the smallest
K in units of one codebook's size, K x 40 floats.

    python bench/codebook_memory.py [--quick] [--sizes 1024,65536] [--out FILE]
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from bench import common  # noqa: E402
from tokenflow_jax import config as config_lib  # noqa: E402
from tokenflow_jax.recipes.tokenizer import train as trainer  # noqa: E402
from tokenflow_jax.train import loop  # noqa: E402

SIZES = (1024, 4096, 16384, 65536, 262144, 1048576)
CODE_DIM = 40


def step_memory(codebook_size: int, update: str) -> dict[str, float]:
    demo = config_lib.load_config("configs/demo.py")
    config = config_lib.build_config(demo.tokenizer.config, [
        *demo.tokenizer.overrides, "--config.mesh.num_devices=1", f"--config.quantizer.codebook_size={codebook_size}",
        f"--config.quantizer.codebook_update={update!r}"])
    mesh, rules = loop.mesh_and_rules(config)
    program = trainer.aot_programs(config, mesh, rules)[0]
    start = time.time()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        memory = program.fn.lower(*program.args).compile().memory_analysis()
    return {"codebook_size": codebook_size, "update": update, "compile_s": time.time() - start,
            "argument_mb": memory.argument_size_in_bytes / 1e6, "temp_mb": memory.temp_size_in_bytes / 1e6}


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="codebook sizes, comma-separated")
    args = parser.parse_args()
    common.enable_compile_cache()
    sizes = [int(k) for k in args.sizes.split(",")]
    if args.quick:
        sizes = [sizes[0], sizes[-1]]
    rows = []
    for update in ("loss", "ema"):
        for k in sizes:
            row = step_memory(k, update)
            first = next((r for r in rows if r["update"] == update), row)
            # Growth of the temporaries over the smallest K, in codebooks (K x 40 float32).
            added_codes = k - first["codebook_size"]
            row["temp_growth_codebooks"] = ((row["temp_mb"] - first["temp_mb"]) * 1e6 / (4 * CODE_DIM * added_codes)
                                            if added_codes else 0.0)
            rows.append(row)
            common.print_table([row], ["update", "codebook_size", "argument_mb", "temp_mb", "temp_growth_codebooks",
                                       "compile_s"])
    common.print_table(rows, ["update", "codebook_size", "argument_mb", "temp_mb", "temp_growth_codebooks"],
                       title="tokenizer train step (demo's tiny, batch 8, one device), XLA memory analysis")
    common.write_json("codebook_memory", {"machine": common.machine_info(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
