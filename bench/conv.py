"""XLA CPU convolution speed vs PyTorch on the pixel CNN's dominant 3x3 convolutions (float32, 2 threads).

For each shape (batch, side, C_in, C_out) of the TokenFlow pixel encoder / (enhanced) decoder, side by side
in one process: XLA NHWC (what flax ``nn.Conv`` emits), XLA NCHW, torch NCHW and torch channels_last, and
XLA NHWC under ``jax.default_matmul_precision`` 'highest' and 'bfloat16'. With ``--xla-flags-sweep`` the
XLA rows are re-measured in child processes under other XLA_FLAGS (they must be set before jax starts).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402

# (batch, side, c_in, c_out): encoder level 0 at 256 px, enhanced decoder top level (256 ch at 256 px),
# decoder 512 ch at 64 px, xl encoder level 0 at 432 px, a lowest-resolution 1024-ch conv.
SHAPES = [(1, 256, 128, 128), (1, 256, 256, 256), (1, 64, 512, 512), (1, 432, 128, 128), (1, 16, 1024, 1024)]
QUICK_SHAPES = [(1, 256, 128, 128), (1, 256, 256, 256)]
# Child processes, in this order; "baseline" (no extra flag) runs first and last to bracket load drift.
FLAG_SETS = [
    ("baseline", ""),
    ("xnnpack", "--xla_cpu_use_xnnpack=true"),
    ("onednn", "--xla_cpu_use_onednn=true"),
    ("vector512", "--xla_cpu_prefer_vector_width=512"),
    ("baseline again", ""),
]


def conv_gflop(shape: tuple[int, int, int, int]) -> float:
    b, s, ci, co = shape
    return 2.0 * b * s * s * 9 * ci * co / 1e9


def xla_rows(shape, quick: bool, precisions=("default",), layouts=("NHWC",)) -> list[dict[str, Any]]:
    b, s, ci, co = shape
    rng = np.random.default_rng(0)
    rows = []
    for layout in layouts:
        x = rng.standard_normal((b, s, s, ci) if layout == "NHWC" else (b, ci, s, s), dtype=np.float32)
        k = rng.standard_normal((3, 3, ci, co) if layout == "NHWC" else (co, ci, 3, 3), dtype=np.float32) * 0.02
        dims = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")
        x, k = jnp.asarray(x), jnp.asarray(k)
        for precision in precisions:
            def conv(x, k, precision=precision, dims=dims):
                p = None if precision == "default" else precision
                with jax.default_matmul_precision(p) if p else _null():
                    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)

            t = common.time_fn(jax.jit(conv), x, k, warmup=1, repeats=2 if quick else 5, min_seconds=0.5)
            rows.append(dict(shape=str(shape), impl=f"xla {layout}", precision=precision, ms=t.median * 1e3,
                             gflops=conv_gflop(shape) / t.median))
    return rows


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def torch_rows(shape, quick: bool) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    b, s, ci, co = shape
    x = torch.randn(b, ci, s, s)
    w = torch.randn(co, ci, 3, 3) * 0.02
    rows = []
    for fmt in ("NCHW", "channels_last"):
        xx = x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x
        ww = w.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else w
        with torch.no_grad():
            t = common.time_fn(lambda xx=xx, ww=ww: torch.nn.functional.conv2d(xx, ww, padding=1), warmup=1,
                               repeats=2 if quick else 5, min_seconds=0.5)
        rows.append(dict(shape=str(shape), impl=f"torch {fmt}", precision="fp32", ms=t.median * 1e3,
                         gflops=conv_gflop(shape) / t.median))
    return rows


def flags_rows(name: str, flags: str, quick: bool) -> list[dict[str, Any]]:
    """XLA NHWC rows measured in a child process with extra XLA_FLAGS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        cmd = [sys.executable, __file__, "--xla-only", "--child-out", out] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"flags {flags!r} failed: {proc.stderr[-1500:]}", flush=True)
            return []
        with open(out) as f:
            rows = json.load(f)
    for row in rows:
        row["impl"] += f" [{name}]"
    return rows


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--xla-flags-sweep", action="store_true")
    parser.add_argument("--xla-only", action="store_true", help=argparse_hidden())
    parser.add_argument("--child-out", default=None, help=argparse_hidden())
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.xla_only:  # child of --xla-flags-sweep
        rows = [r for s in shapes for r in xla_rows(s, args.quick)]
        with open(args.child_out, "w") as f:
            json.dump(rows, f)
        return
    info = common.machine_info()
    rows = []
    for shape in shapes:
        rows += xla_rows(shape, args.quick, precisions=("default", "highest", "bfloat16"), layouts=("NHWC", "NCHW"))
        rows += torch_rows(shape, args.quick)
        print(f"  {shape} done", flush=True)
    if args.xla_flags_sweep:
        for name, flags in FLAG_SETS:
            rows += flags_rows(name, flags, args.quick)
    matmul = info["matmul_f32_2048_gflops"]["median"]
    for row in rows:
        row["of_matmul"] = row["gflops"] / matmul
    rows.sort(key=lambda r: (r["shape"], -r["gflops"]))
    common.print_table(rows, ["shape", "impl", "precision", "ms", "gflops", "of_matmul"],
                       title=f"3x3 conv, stride 1, SAME; (batch, side, C_in, C_out); matmul {matmul:.0f} GFLOP/s")
    common.write_json("conv", {"machine": info, "rows": rows}, args.out)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
