"""Nearest-code search throughput and memory: naive vs chunked vs sharded (``tokenflow_jax.ops.nearest_code``).

Workload: 64 images x 817 tokens (the b/256 token count) = 52,288 tokens of L2-normalised random 32-d
semantic and 8-d pixel halves, against normalised random codebooks of K codes, K in {32768, 131072,
1048576}. Rows:

* ``chunked`` at the default memory budget (``DEFAULT_MEMORY_BYTES``) and a larger one;
* ``naive`` on all tokens where its XLA buffers (``memory_analysis``) fit in 40% of physical RAM, else a
  "skipped: would need X GiB" row, plus ``naive`` and ``chunked`` side by side on the largest token
  subset that fits (whole images, a power of two), so the two can be compared at every K;
* ``sharded``: the chunked search with the codebook split over 8 fake CPU devices, run in a subprocess
  (bench/quantizer_sharded.py) because XLA_FLAGS must be set before jax is imported;
* ``--sweep``: chunked search over a grid of explicit (token_block, code_block) plans.

Indices of every method are compared with the naive ones on the same tokens ("eq_naive": fraction
equal; near-ties may flip in the last float32 bit), and with the default chunked search otherwise.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from tokenflow_jax.ops import nearest_code as nc  # noqa: E402

TOKENS_PER_IMAGE = 817  # b/256: scales 1..16, sum s^2
IMAGES = 64
SEMANTIC_DIM, PIXEL_DIM = 32, 8
RAM_FRACTION = 0.4  # naive runs only if its XLA buffers fit in this share of physical memory
LARGE_BUDGET = 512 * common.MiB


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_tokens(n: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """[n, 32], [n, 8] normalised token halves (deterministic for a seed; a prefix is a smaller batch)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(unit_rows(rng, n, SEMANTIC_DIM)), jnp.asarray(unit_rows(rng, n, PIXEL_DIM))


def make_codebooks(k: int, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    """[k, 32], [k, 8] normalised codebooks."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(unit_rows(rng, k, SEMANTIC_DIM)), jnp.asarray(unit_rows(rng, k, PIXEL_DIM))


def naive_bytes(n: int, k: int, z_sem, z_pix, e_sem, e_pix) -> int:
    """XLA's peak-buffer estimate of the naive search for n tokens (compiled, never run)."""
    args = (z_sem[:n], z_pix[:n], e_sem, e_pix)
    compiled = jax.jit(nc.nearest_code_naive).lower(*args).compile()
    return common.memory_stats(compiled)["peak_estimate_bytes"]


def adaptive_time(compiled: Any, args: tuple, quick: bool) -> common.Timing:
    """One warm-up call, then as many timed calls as the call length allows (long ones are noisy less).

    A first call over 60 s (K = 1M) is the measurement itself: the executable is compiled ahead of time,
    so the first call's only extra cost is allocating its buffers, negligible at that length.
    """
    t0 = time.perf_counter()
    common.block(compiled(*args))
    first = time.perf_counter() - t0
    if first > 60:
        return common.Timing(first, first, [first])
    repeats = 1 if quick or first > 20 else 2 if first > 5 else 5
    timing = common.time_fn(compiled, *args, warmup=0, repeats=repeats)
    timing.runs.insert(0, first)  # kept for the record; median/min are over the post-warm-up calls
    return timing


def run_search(name: str, fn: Any, args: tuple, quick: bool, **row: Any) -> tuple[dict[str, Any], np.ndarray]:
    """Compiles, measures memory, times one search variant; returns (table row, indices)."""
    jitted = jax.jit(fn)
    compiled, compile_s = common.compile_timed(jitted, *args)
    mem = common.memory_stats(compiled)
    timing = adaptive_time(compiled, args, quick)
    indices = np.asarray(compiled(*args).indices)
    n = args[0].shape[0]
    row = dict(
        method=name, tokens=n, K=args[2].shape[0], **row,
        s_per_call=timing.median, s_min=timing.min, tokens_per_s=n / timing.median,
        temp_MiB=mem["temp_bytes"] / common.MiB, args_MiB=mem["argument_bytes"] / common.MiB,
        peak_MiB=mem["peak_estimate_bytes"] / common.MiB, compile_s=compile_s,
        timing=timing.as_dict(), memory=mem,
    )
    print(f"  {name} {row.get('note', '')} N={n} K={row['K']} {row.get('plan', '')}: {timing.median:.2f} s, "
          f"{row['tokens_per_s']:,.0f} tokens/s, temp {row['temp_MiB']:.0f} MiB", flush=True)
    return row, indices


def chunked(memory_bytes: int | None = None, blocks: tuple[int, int] | None = None):
    kwargs: dict[str, Any] = {"blocks": blocks} if blocks else {"memory_bytes": memory_bytes or nc.DEFAULT_MEMORY_BYTES}
    return functools.partial(nc.nearest_code_chunked, **kwargs)


def plan_text(n: int, k: int, memory_bytes: int) -> str:
    tb, cb = nc.plan_blocks(n, k, memory_bytes)
    return f"{tb}x{cb}"


def run_sharded(k: int, devices: int, mesh_shape: str, quick: bool) -> tuple[dict[str, Any], np.ndarray] | None:
    """The sharded search in a child process with ``devices`` fake CPU devices; None if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sharded.json")
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "quantizer_sharded.py"),
               "--k", str(k), "--tokens", str(IMAGES * TOKENS_PER_IMAGE), "--mesh", mesh_shape, "--out", out]
        if quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"sharded search failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            return None
        with open(out) as f:
            row = json.load(f)
        indices = np.load(out + ".npy")
    return row, indices


def eq(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--ks", default=None, help="comma-separated codebook sizes (default 32768,131072,1048576)")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of explicit block plans")
    parser.add_argument("--sweep-k", type=int, default=131072)
    parser.add_argument("--no-sharded", action="store_true")
    parser.add_argument("--sharded-k", type=int, default=131072)
    args = parser.parse_args()
    common.enable_compile_cache()

    ks = [int(k) for k in args.ks.split(",")] if args.ks else (
        [32768, 131072] if args.quick else [32768, 131072, 1048576])
    info = common.machine_info()
    n_all = IMAGES * TOKENS_PER_IMAGE
    z_sem, z_pix = make_tokens(n_all)
    ram_limit = RAM_FRACTION * common.physical_memory_bytes()
    print(f"matmul f32 2048: {info['matmul_f32_2048_gflops']['median']:.0f} GFLOP/s (median), "
          f"{info['matmul_f32_2048_gflops']['best']:.0f} (best); naive limit {ram_limit / common.GiB:.1f} GiB",
          flush=True)

    rows: list[dict[str, Any]] = []
    for k in ks:
        e_sem, e_pix = make_codebooks(k)
        full = (z_sem, z_pix, e_sem, e_pix)
        # --- all tokens: chunked at two budgets, naive if it fits
        ref_row, ref_idx = run_search("chunked", chunked(), full, args.quick,
                                      budget_MiB=nc.DEFAULT_MEMORY_BYTES // common.MiB,
                                      plan=plan_text(n_all, k, nc.DEFAULT_MEMORY_BYTES))
        rows.append(ref_row)
        big_row, big_idx = run_search("chunked", chunked(LARGE_BUDGET), full, args.quick,
                                      budget_MiB=LARGE_BUDGET // common.MiB, plan=plan_text(n_all, k, LARGE_BUDGET))
        big_row["eq_chunked"] = eq(big_idx, ref_idx)
        rows.append(big_row)
        need = naive_bytes(n_all, k, *full)
        if need <= ram_limit:
            row, idx = run_search("naive", nc.nearest_code_naive, full, args.quick)
            ref_row["eq_naive"] = big_row["eq_naive"] = eq(ref_idx, idx)
            rows.append(row)
        else:
            note = f"skipped: would need {need / common.GiB:.1f} GiB"
            rows.append(dict(method="naive", tokens=n_all, K=k, note=note))
            # --- the largest whole-image power-of-two subset the naive search fits in
            images = IMAGES // 2
            while images > 1 and naive_bytes(images * TOKENS_PER_IMAGE, k, *full) > ram_limit:
                images //= 2
            n = images * TOKENS_PER_IMAGE
            sub = (z_sem[:n], z_pix[:n], e_sem, e_pix)
            naive_row, naive_idx = run_search("naive", nc.nearest_code_naive, sub, args.quick, note="subset")
            sub_row, sub_idx = run_search("chunked", chunked(), sub, args.quick, note="subset",
                                          budget_MiB=nc.DEFAULT_MEMORY_BYTES // common.MiB,
                                          plan=plan_text(n, k, nc.DEFAULT_MEMORY_BYTES))
            sub_row["eq_naive"] = eq(sub_idx, naive_idx)
            sub_row["eq_chunked"] = eq(sub_idx, ref_idx[:n])
            ref_row["eq_naive"] = big_row["eq_naive"] = sub_row["eq_naive"]  # same code path on a prefix
            sub_row["naive_over_chunked"] = naive_row["tokens_per_s"] / sub_row["tokens_per_s"]
            rows += [naive_row, sub_row]
        if not args.no_sharded and k == args.sharded_k:
            for devices, mesh in [(8, "1x8")]:
                got = run_sharded(k, devices, mesh, args.quick)
                if got is not None:
                    row, idx = got
                    row["eq_chunked"] = eq(idx, ref_idx)
                    rows.append(row)
        del e_sem, e_pix, full

    sweep_rows = sweep(args.sweep_k, z_sem, z_pix, args.quick) if args.sweep else []
    columns = ["method", "tokens", "K", "budget_MiB", "plan", "note", "s_per_call", "s_min", "tokens_per_s",
               "temp_MiB", "args_MiB", "peak_MiB", "eq_naive", "eq_chunked", "naive_over_chunked"]
    print()
    common.print_table(rows, columns, title="nearest-code search (float32, HIGHEST precision)")
    if sweep_rows:
        print()
        common.print_table(sweep_rows, ["plan", "tokens", "K", "s_per_call", "s_min", "tokens_per_s", "temp_MiB",
                                        "eq_chunked"], title=f"block-plan sweep at K={args.sweep_k}")
    common.write_json("quantizer", {"machine": info, "rows": rows, "sweep": sweep_rows}, args.out)


def sweep(k: int, z_sem: jax.Array, z_pix: jax.Array, quick: bool) -> list[dict[str, Any]]:
    """Chunked search over a grid of (token_block, code_block) plans at one K (all tokens)."""
    e_sem, e_pix = make_codebooks(k)
    args = (z_sem, z_pix, e_sem, e_pix)
    _, ref_idx = run_search("chunked", chunked(), args, True)
    token_blocks = [256, 1024, 4096] if quick else [128, 512, 1024, 2048, 4096, 8192, 16384]
    code_blocks = [1024, 4096, 16384] if quick else [512, 2048, 4096, 8192, 16384, 32768]
    rows = []
    for tb in token_blocks:
        for cb in code_blocks:
            if tb * cb * 4 > 2 * common.GiB:  # one tile matrix over 2 GiB: not a memory-bounded plan
                continue
            row, idx = run_search("chunked", chunked(blocks=(tb, cb)), args, True, plan=f"{tb}x{cb}")
            row["eq_chunked"] = eq(idx, ref_idx)
            rows.append(row)
            print(f"  sweep {tb}x{cb}: {row['tokens_per_s']:,.0f} tokens/s, temp {row['temp_MiB']:.0f} MiB",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
