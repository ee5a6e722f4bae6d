"""Where the time of the chunked nearest-code search goes, and an exact alternative to its argmin.

Re-implements the loop of ``nearest_code_chunked`` (w_dis = 1) with different per-tile bodies, all timed
side by side on the same 52,288 tokens and K codes, for one or more (token_block, code_block) plans:

* ``dots+min``: the two matmuls (inner dims 32 and 8), their sum and a row minimum (no index);
* ``dist+min``: the full d_sem + d_pix tile (``shared_mapping_distances``) and a row minimum (no index);
* ``argmin``: distances + ``jnp.argmin`` + ``take_along_axis``: the current search body;
* ``min_then_first``: distances + ``jnp.min`` + the lowest column where d == min. Two single-output
  reductions instead of XLA's variadic (value, index) reduce, with the identical result (first minimum
  included) for NaN-free distances.

The first two are not searches (their indices are meaningless); they split the time into matmul,
elementwise and reduction parts. ``eq_argmin`` checks min_then_first against argmin.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, quantizer  # noqa: E402
from tokenflow_jax.ops import nearest_code as nc  # noqa: E402


def dots_min_body(z_s, z_p, e_s, e_p) -> tuple[jax.Array, jax.Array]:
    hi = jax.lax.Precision.HIGHEST
    d = jnp.einsum("nd,kd->nk", z_s, e_s, precision=hi) + jnp.einsum("nd,kd->nk", z_p, e_p, precision=hi)
    return jnp.zeros(d.shape[:1], jnp.int32), jnp.min(d, axis=1)


def dist_min_body(*a) -> tuple[jax.Array, jax.Array]:
    d = nc.shared_mapping_distances(*a, 1.0)
    return jnp.zeros(d.shape[:1], jnp.int32), jnp.min(d, axis=1)


def argmin_body(*a) -> tuple[jax.Array, jax.Array]:
    d = nc.shared_mapping_distances(*a, 1.0)
    i = jnp.argmin(d, axis=1).astype(jnp.int32)
    return i, jnp.take_along_axis(d, i[:, None], axis=1)[:, 0]


def min_then_first_body(*a) -> tuple[jax.Array, jax.Array]:
    """Same (index, distance) as :func:`argmin_body` for NaN-free d: the minimum, then the lowest column
    holding it. Both are single-output reductions, which XLA vectorises; argmin's is not."""
    d = nc.shared_mapping_distances(*a, 1.0)
    m = jnp.min(d, axis=1)
    cols = jax.lax.broadcasted_iota(jnp.int32, d.shape, 1)
    i = jnp.min(jnp.where(d == m[:, None], cols, jnp.int32(d.shape[1])), axis=1)
    return i, m


BODIES = {"dots+min": dots_min_body, "dist+min": dist_min_body, "argmin": argmin_body,
          "min_then_first": min_then_first_body}


def chunked_with(body, z_sem, z_pix, e_sem, e_pix, blocks: tuple[int, int]):
    """``nearest_code_chunked``'s loop (w_dis = 1) with a different per-tile reduction ``body``."""
    n, k = z_sem.shape[0], e_sem.shape[0]
    tb, cb = blocks
    nt = math.ceil(n / tb)
    pad = nt * tb - n
    zs = jnp.pad(z_sem, ((0, pad), (0, 0))).reshape(nt, tb, -1)
    zp = jnp.pad(z_pix, ((0, pad), (0, 0))).reshape(nt, tb, -1)
    es, ep = e_sem.reshape(k // cb, cb, -1), e_pix.reshape(k // cb, cb, -1)
    offsets = jnp.arange(k // cb, dtype=jnp.int32) * cb

    def per_tokens(z):
        def step(carry, block):
            best_d, best_i = carry
            i, m = body(z[0], z[1], block[0], block[1])
            better = m < best_d
            return (jnp.where(better, m, best_d), jnp.where(better, i + block[2], best_i)), None

        init = (jnp.full((tb,), jnp.inf, jnp.float32), jnp.zeros((tb,), jnp.int32))
        (d, i), _ = jax.lax.scan(step, init, (es, ep, offsets))
        return i, d

    i, d = jax.lax.map(per_tokens, (zs, zp))
    return i.reshape(-1)[:n], d.reshape(-1)[:n]


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--plans", default="1024x4096", help="comma-separated TOKENSxCODES tile shapes")
    parser.add_argument("--k", type=int, default=131072)
    parser.add_argument("--bodies", default=",".join(BODIES))
    args = parser.parse_args()
    common.enable_compile_cache()
    info = common.machine_info()
    n = quantizer.IMAGES * quantizer.TOKENS_PER_IMAGE
    z_s, z_p = quantizer.make_tokens(n)
    e_s, e_p = quantizer.make_codebooks(args.k)
    rows: list[dict[str, Any]] = []
    for plan in args.plans.split(","):
        blocks = tuple(int(s) for s in plan.split("x"))
        outputs = {}
        for name in args.bodies.split(","):
            f = jax.jit(lambda *a, body=BODIES[name], b=blocks: chunked_with(body, *a, blocks=b))
            t = common.time_fn(f, z_s, z_p, e_s, e_p, warmup=1, repeats=1 if args.quick else 2)
            outputs[name] = np.asarray(f(z_s, z_p, e_s, e_p)[0])
            rows.append(dict(K=args.k, plan=plan, body=name, s_per_call=t.median, s_min=t.min,
                             ns_per_pair=t.median / (n * args.k) * 1e9, tokens_per_s=n / t.median))
            if name == "min_then_first" and "argmin" in outputs:
                rows[-1]["eq_argmin"] = float(np.mean(outputs[name] == outputs["argmin"]))
            print(f"  {plan} {name}: {t.median:.2f} s", flush=True)
    common.print_table(rows, ["K", "plan", "body", "s_per_call", "s_min", "ns_per_pair", "tokens_per_s", "eq_argmin"],
                       title=f"chunked nearest-code search anatomy ({n} tokens)")
    common.write_json("quantizer_tile", {"machine": info, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
