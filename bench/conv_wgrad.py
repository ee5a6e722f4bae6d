"""3x3 convolution weight gradient on CPU: XLA's own against matmul formulations.

XLA:CPU's weight-gradient convolution is far below its forward convolution for large maps with few
channels (the pixel CNN's first levels), which holds the tokenizer train step's MFU down. This compares,
for dW = sum_{n,h,w} x_pad[n, h+i, w+j, :]^T dy[n, h, w, :]:

* ``xla``: ``jax.vjp`` of ``lax.conv_general_dilated`` with respect to the kernel;
* ``einsum``: 9 ``einsum('nhwc,nhwd->cd')`` over shifted slices of the padded input;
* ``reshape``: 9 plain matmuls ``shifted.reshape(-1, Cin).T @ dy.reshape(-1, Cout)``;
* ``im2col``: one matmul of the [N*H*W, 9*Cin] patch matrix with dy.

Each row: GFLOP/s (2 * N*H*W * 9 * Cin * Cout per gradient), the ratio to XLA's, and the relative error
against XLA's result.

    python bench/conv_wgrad.py [--quick] [--out FILE]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402

SHAPES = [(2, 224, 128), (2, 112, 256), (2, 56, 512)]  # (batch, size, channels): b's pixel CNN levels
PAD = ((1, 1), (1, 1))


def shifted(x: jax.Array, size: int):
    """The 9 shifted [N, size, size, C] windows of x padded by one pixel, row-major over the taps."""
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [xp[:, i : i + size, j : j + size, :] for i in range(3) for j in range(3)]


def formulations(size: int, channels: int, w: jax.Array):
    def xla(x, g):
        conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), PAD, dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
        return jax.vjp(conv, w)[1](g)[0]

    def einsum(x, g):
        taps = [jnp.einsum("nhwc,nhwd->cd", s, g) for s in shifted(x, size)]
        return jnp.stack(taps).reshape(3, 3, channels, channels)

    def reshape(x, g):
        g2 = g.reshape(-1, channels)
        taps = [s.reshape(-1, channels).T @ g2 for s in shifted(x, size)]
        return jnp.stack(taps).reshape(3, 3, channels, channels)

    def im2col(x, g):
        cols = jnp.concatenate(shifted(x, size), axis=-1).reshape(-1, 9 * channels)
        return (cols.T @ g.reshape(-1, channels)).reshape(3, 3, channels, channels)

    return {"xla": xla, "einsum": einsum, "reshape": reshape, "im2col": im2col}


def main() -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args()
    info = common.machine_info()
    rng = np.random.default_rng(0)
    rows = []
    for batch, size, channels in SHAPES[:2] if args.quick else SHAPES:
        x = jnp.asarray(rng.standard_normal((batch, size, size, channels)).astype(np.float32))
        g = jnp.asarray(rng.standard_normal((batch, size, size, channels)).astype(np.float32))
        w = jnp.zeros((3, 3, channels, channels), jnp.float32)
        flops = 2.0 * batch * size * size * 9 * channels * channels
        reference, xla_gflops = None, None
        for name, fn in formulations(size, channels, w).items():
            jitted = jax.jit(fn)
            out = jitted(x, g)
            reference = out if reference is None else reference
            timing = common.time_fn(jitted, x, g, warmup=0, repeats=2 if args.quick else 4)
            gflops = flops / timing.min / 1e9
            xla_gflops = xla_gflops or gflops
            rows.append(dict(shape=f"{batch}x{size}x{size}x{channels}", method=name, ms=timing.min * 1e3,
                             gflops=gflops, vs_xla=gflops / xla_gflops,
                             rel_err=float(jnp.max(jnp.abs(out - reference)) / jnp.max(jnp.abs(reference)))))
            print(f"  {rows[-1]['shape']} {name}: {gflops:.0f} GFLOP/s", flush=True)
    matmul = info["matmul_f32_2048_gflops"]["best"]
    for row in rows:
        row["of_matmul"] = row["gflops"] / matmul
    print()
    common.print_table(rows, ["shape", "method", "ms", "gflops", "of_matmul", "vs_xla", "rel_err"],
                       title=f"3x3 conv weight gradient, f32 (best 2048^3 matmul {matmul:.0f} GFLOP/s)")
    common.write_json("conv_wgrad", {"machine": info, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
