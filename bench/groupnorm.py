"""GroupNorm + swish on the pixel CNN's largest maps: flax ``nn.GroupNorm`` vs reformulations.

The XLA profile of b256e encode (bench/xla_profile.py) shows the GroupNorm statistics at 256 x 256 x 128
taking ~9 ms per reduction pass (~3.5 GB/s): XLA reduces the [B, H, W, 32, C/32] view over (H, W, C/32),
a strided pattern. Variants, timed side by side with their max abs error against a float64 reference:

* ``flax``: ``nn.GroupNorm(use_fast_variance=False)`` as in ``layers.group_norm`` (two-pass variance);
* ``flax fast``: ``use_fast_variance=True`` (one pass, E[x^2] - E[x]^2: less accurate);
* ``channel sums``: two-pass, but each pass reduces the [B, H*W, C] map over H*W to per-channel sums
  (a contiguous reduction), then adds the C/32 channels of a group: same math, different summation order.
"""
from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402

GROUPS, EPS = 32, 1e-6
SHAPES = [(1, 256, 256, 128), (1, 256, 256, 256), (4, 256, 256, 128), (1, 64, 64, 512)]


def flax_gn(fast: bool):
    module = nn.GroupNorm(num_groups=GROUPS, epsilon=EPS, use_fast_variance=fast)

    def f(x, scale, bias):
        y = module.apply({"params": {"scale": scale, "bias": bias}}, x)
        return y * jax.nn.sigmoid(y)

    return f


def channel_sums_gn(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Two-pass GroupNorm from per-channel sums over H*W (then summed within each group), then swish."""
    b, h, w, c = x.shape
    per_group = c // GROUPS
    count = h * w * per_group
    flat = x.reshape(b, h * w, c)
    mean = jnp.sum(flat, axis=1).reshape(b, GROUPS, per_group).sum(-1) / count  # [B, G]
    centred = flat - jnp.repeat(mean, per_group, axis=1)[:, None, :]
    var = jnp.sum(centred * centred, axis=1).reshape(b, GROUPS, per_group).sum(-1) / count
    inv = jnp.repeat(jax.lax.rsqrt(var + EPS), per_group, axis=1)  # [B, C]
    y = centred * (inv * scale)[:, None, :] + bias
    return (y * jax.nn.sigmoid(y)).reshape(b, h, w, c)


VARIANTS = {"flax": flax_gn(False), "flax fast": flax_gn(True), "channel sums": channel_sums_gn}


def reference(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    b, h, w, c = x.shape
    g = x.astype(np.float64).reshape(b, h, w, GROUPS, c // GROUPS)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) / np.sqrt(var + EPS)).reshape(b, h, w, c) * scale + bias
    return y / (1 + np.exp(-y))


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    info = common.machine_info()
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for shape in SHAPES[:2] if args.quick else SHAPES:
        # A non-zero mean makes the one-pass variance's cancellation visible, as in real activations.
        x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 3).astype(np.float32)
        scale = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
        bias = rng.uniform(-0.5, 0.5, shape[-1]).astype(np.float32)
        ref = reference(x, scale, bias)
        xs = (jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
        for name, fn in VARIANTS.items():
            jitted = jax.jit(fn)
            t = common.time_fn(jitted, *xs, warmup=2, repeats=3 if args.quick else 10, min_seconds=0.5)
            err = float(np.max(np.abs(np.asarray(jitted(*xs)) - ref)))
            rows.append(dict(shape=str(shape), variant=name, ms=t.median * 1e3, ms_min=t.min * 1e3,
                             GB_per_s=x.nbytes / t.median / 1e9, max_abs_err=err))
    common.print_table(rows, ["shape", "variant", "ms", "ms_min", "GB_per_s", "max_abs_err"],
                       title="GroupNorm(32) + swish, float32 (GB/s: input bytes / time)")
    common.write_json("groupnorm", {"machine": info, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
