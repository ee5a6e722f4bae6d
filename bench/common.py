"""Shared helpers for the benchmark scripts under ``bench/``.

Every script is run as ``python bench/X.py [--quick] [--out FILE]``: it prints a table and writes a JSON
file (default ``bench/results/X-<timestamp>.json``, git-ignored) holding the rows and :func:`machine_info`.

The machines are shared and noisy (other people's CPU-heavy jobs run beside ours), so a script measures
the things it compares side by side in one process and reports ratios; the measured matmul rate of the
same run is the yardstick for "fraction of peak".
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")
if REPO not in sys.path:  # `python bench/X.py` puts bench/ on the path, not the repository root
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GiB = 2**30
MiB = 2**20


# ------------------------------------------------------------------------------------------ set-up
def enable_compile_cache() -> str:
    """Turns on JAX's persistent compilation cache (JAX docs, "Persistent compilation cache"; it works on CPU too)
    unless the caller set one already.

    Re-running a benchmark then skips most of the XLA compile of the big models. The cache lives under
    bench/results/, which is git-ignored.
    """
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(RESULTS_DIR, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def base_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every bench script shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--out", default=None, help="JSON output path (default bench/results/<name>-<time>.json)")
    return parser


# ------------------------------------------------------------------------------------ machine info
def config_names(parser: argparse.ArgumentParser, value: str, known: Any) -> list[str]:
    """The comma-separated ``--configs`` value as a list; unknown names are a parser error listing ``known``."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown --configs {unknown}; known: {sorted(known)}")
    return names


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_gflops(n: int = 2048, min_seconds: float = 1.0) -> dict[str, float]:
    """f32 n x n jitted matmul rate in GFLOP/s: ``median`` over calls in a >= ``min_seconds`` loop and ``best``.

    One 2048^3 matmul is 17 GFLOP (~0.15 s here), so per-call dispatch overhead is negligible.
    """
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), np.float32))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return {"n": n, "calls": len(times), "median": flops / statistics.median(times) / 1e9,
            "best": flops / min(times) / 1e9}


def machine_info(matmul: dict[str, float] | None = None) -> dict[str, Any]:
    """What the numbers were measured on; measures the matmul rate unless given."""
    import flax

    device = jax.devices()[0]
    return {
        "time": dt.datetime.now().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "load_average_1m": os.getloadavg()[0],  # > cpu_count means someone else is busy too
        "physical_memory_gib": round(physical_memory_bytes() / GiB, 1),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_f32_2048_gflops": matmul if matmul is not None else matmul_gflops(),
    }


# ------------------------------------------------------------------------------------------ timing
@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of repeated calls after warm-up."""

    median: float
    min: float
    runs: list[float]
    compile_s: float | None = None  # lower + compile of the jitted function, when measured

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def block(tree: Any) -> Any:
    """block_until_ready on every array leaf (outputs may be tuples / NamedTuples)."""
    return jax.tree.map(lambda x: x.block_until_ready() if isinstance(x, jax.Array) else x, tree)


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 1, repeats: int = 3, min_seconds: float = 0.0) -> Timing:
    """Times ``fn(*args)``: ``warmup`` untimed calls, then at least ``repeats`` timed calls (more while the
    total is under ``min_seconds``). Median and min are both reported: the min is the least disturbed by
    other jobs on the machine, the median is the typical figure."""
    for _ in range(warmup):
        block(fn(*args))
    runs: list[float] = []
    start = time.perf_counter()
    while len(runs) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        block(fn(*args))
        runs.append(time.perf_counter() - t0)
    return Timing(statistics.median(runs), min(runs), runs)


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """(compiled executable, seconds spent in lower + compile) of a ``jax.jit`` function for ``args``."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


# ------------------------------------------------------------------------------ cost and memory
def _first(analysis: Any) -> dict[str, Any]:
    # Older jax returned a list with one dict per program; 0.10 returns the dict.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def xla_flops(stage: Any) -> float:
    """FLOPs by XLA's cost analysis of a ``Lowered`` or ``Compiled`` stage.

    Beware: a while loop (``lax.scan``, ``nn.scan``, ``lax.map``) has its body counted ONCE, whatever the
    trip count; see :func:`unrolled_flops` for the loop-corrected figure.
    """
    return float(_first(stage.cost_analysis()).get("flops", 0.0))


def _unroll_params(params: dict[str, Any]) -> dict[str, Any]:
    from jax.extend import core as jex_core

    out = {}
    for name, value in params.items():
        if isinstance(value, jex_core.ClosedJaxpr):
            value = unroll_closed_jaxpr(value)
        elif isinstance(value, jex_core.Jaxpr):
            value = unroll_closed_jaxpr(jex_core.ClosedJaxpr(value, ())).jaxpr
        elif isinstance(value, tuple) and value and all(isinstance(v, jex_core.ClosedJaxpr) for v in value):
            value = tuple(unroll_closed_jaxpr(v) for v in value)  # cond branches
        out[name] = value
    return out


def unroll_closed_jaxpr(closed: Any) -> Any:
    """A copy of ``closed`` in which every ``scan`` (at any nesting depth) is fully unrolled.

    Full unrolling (``unroll == length``) makes JAX emit the iterations inline with no while loop, so
    XLA's cost analysis then counts every iteration.
    """
    eqns = []
    for eqn in closed.jaxpr.eqns:
        params = _unroll_params(eqn.params)
        if eqn.primitive.name == "scan":
            params["unroll"] = max(int(params["length"]), 1)
        eqns.append(eqn.replace(params=params))
    return closed.replace(jaxpr=closed.jaxpr.replace(eqns=eqns))


def unrolled_flops(fn: Callable[..., Any], *args: Any) -> float:
    """Loop-corrected FLOPs of ``fn(*args)``: XLA cost analysis of the lowered (not compiled) HLO of a
    variant of ``fn`` whose scans are all unrolled (:func:`unroll_closed_jaxpr`).

    Lowering is cheap (no XLA compile), and unoptimised HLO counts the same matmul / conv FLOPs as the
    optimised one (fusion does not change them; only a few elementwise ops may differ).
    """
    from jax.extend import core as jex_core

    closed = jax.make_jaxpr(fn)(*args)
    unrolled = unroll_closed_jaxpr(closed)
    flat = jax.tree.leaves(args)

    def run(*flat_args):
        return jex_core.jaxpr_as_fun(unrolled)(*flat_args)

    return xla_flops(jax.jit(run).lower(*flat))


def memory_stats(compiled: Any) -> dict[str, int]:
    """Byte sizes from ``compiled.memory_analysis()``: arguments, outputs, temporaries (XLA's scratch
    buffers: the activations and tiles live at once) and ``peak_estimate`` = arguments + outputs +
    temporaries - aliased."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    stats = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    stats["peak_estimate_bytes"] = (
        stats["argument_bytes"] + stats["output_bytes"] + stats["temp_bytes"] - stats["alias_bytes"]
    )
    return stats


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB).

    Crude: it only moves when a new maximum is reached, so the delta across a call is a lower bound on what
    the call needed beyond the previous peak.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ output
def fmt(value: Any, digits: int = 3) -> str:
    """Compact cell text: floats to ``digits`` significant figures, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or not np.isfinite(value):
            return f"{value:g}"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """Prints (and returns) a fixed-width table of ``rows`` restricted to ``columns``."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict[str, Any], out: str | None = None) -> str:
    """Writes ``payload`` to ``out`` or bench/results/<name>-<timestamp>.json; prints and returns the path."""
    if out is None:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join(RESULTS_DIR, f"{name}-{stamp}.json")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
    print(f"wrote {out}", flush=True)
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)
