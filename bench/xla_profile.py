"""Per-XLA-op time profile of TokenFlow encode / decode on CPU: which convolutions, dots and fusions dominate.

Runs the jitted op once under ``jax.profiler.trace`` with XLA's per-thunk trace events switched on
(``--xla_cpu_enable_xprof_traceme``; this script sets it before jax starts), reads the Perfetto JSON trace,
and attributes each thunk's wall time to its HLO instruction (bench/hlo_ops.py: opcode, the convolutions
and dots inside a fusion, their FLOPs). Prints the top ops and a summary by kind (conv, dot, reduce,
elementwise, copy); loop instructions (the scans' while loops) are left out of the sums because the ops of
their bodies are traced separately. Times are wall time of each thunk; thunks may overlap when XLA runs
independent ops concurrently, so the sum can exceed the call's wall time.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time
from typing import Any

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench import common, hlo_ops, models  # noqa: E402


def trace_events(fn, *args) -> tuple[list[dict[str, Any]], float]:
    """(complete events of one traced call ``fn(*args)``, wall seconds of that call)."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t0 = time.perf_counter()
            common.block(fn(*args))
            wall = time.perf_counter() - t0
        path = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})], wall


def profile(built: models.Built, op: str, batch: int, repeats: int) -> tuple[list[dict[str, Any]], float]:
    fn = models.encode_fn(built) if op == "encode" else models.decode_fn(built)
    x = (models.images(batch, built.image_size) if op == "encode"
         else models.features(batch, built.grid, built.code_dim))
    compiled = jax.jit(fn).lower(built.variables, x).compile()
    common.block(compiled(built.variables, x))
    return op_times(compiled.as_text(), lambda: compiled(built.variables, x), repeats)


def op_times(hlo_text: str, call, repeats: int) -> tuple[list[dict[str, Any]], float]:
    """(one row per XLA op: kind, calls, ms per call of ``call``, GFLOP/s, what it computes; the least wall
    seconds of the traced calls). ``call()`` runs the compiled program whose optimised HLO is ``hlo_text``
    once (it may thread donated state between calls); warm it up first."""
    infos = hlo_ops.describe(hlo_text)
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    walls = []
    for _ in range(repeats):
        events, wall = trace_events(call)
        walls.append(wall)
        for e in events:
            totals[e["args"]["hlo_op"]] += e["dur"] / 1e6 / repeats
            counts[e["args"]["hlo_op"]] += 1
    rows = []
    for name, seconds in totals.items():
        info = infos.get(name)
        calls = counts[name] // repeats
        flops = (info.flops * calls) if info else 0.0
        rows.append(dict(op=name, kind=info.kind if info else "?", calls=calls, ms=seconds * 1e3,
                         gflops=flops / seconds / 1e9 if flops and seconds else None,
                         detail=(info.detail if info and info.detail else (info.shape if info else ""))[:90]))
    return rows, min(walls)


def summarise(rows: list[dict[str, Any]], wall: float) -> list[dict[str, Any]]:
    by_kind: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"ms": 0.0, "gflop": 0.0})
    for r in rows:
        if r["kind"] == "loop":
            continue
        by_kind[r["kind"]]["ms"] += r["ms"]
        by_kind[r["kind"]]["gflop"] += (r["gflops"] or 0) * r["ms"] / 1e3
    leaf_ms = sum(v["ms"] for v in by_kind.values())
    return [dict(kind=k, ms=v["ms"], share_of_ops=v["ms"] / leaf_ms, share_of_wall=v["ms"] / (wall * 1e3),
                 gflop=v["gflop"], gflops=v["gflop"] / (v["ms"] / 1e3) if v["ms"] else None)
            for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]["ms"])]


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--variant", default="b256e")
    parser.add_argument("--ops", default="encode,decode")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    common.enable_compile_cache()
    info = common.machine_info()
    built = models.build_variant(args.variant)
    result: dict[str, Any] = {"machine": info, "variant": args.variant, "batch": args.batch}
    for op in args.ops.split(","):
        rows, wall = profile(built, op, args.batch, repeats=1 if args.quick else 2)
        rows.sort(key=lambda r: -r["ms"])
        summary = summarise(rows, wall)
        print()
        common.print_table([r for r in rows if r["kind"] != "loop"][: args.top],
                           ["op", "kind", "calls", "ms", "gflops", "detail"],
                           title=f"{args.variant} {op} batch {args.batch}: top XLA ops (call wall {wall:.2f} s)")
        common.print_table(summary, ["kind", "ms", "share_of_ops", "share_of_wall", "gflop", "gflops"],
                           title="by kind")
        result[op] = {"wall_s": wall, "ops": rows, "summary": summary}
    common.write_json(f"xla_profile-{args.variant}", result, args.out)


if __name__ == "__main__":
    main()
