"""TokenFlow encode / decode speed on CPU: seconds per image, FLOPs, fraction of the matmul rate.

Variants ``b256e`` (``b,res=256,enhanced``, 256 px) and ``xl`` (384 px), float32, eval mode, jitted,
random weights (bench/models.py). For each (variant, op, batch): median and min seconds per image, XLA
FLOPs per image (cost analysis of a variant with every scan unrolled, because XLA counts a while-loop
body once: the ViTs' ``nn.scan`` over blocks and the search's ``lax.map``/``scan``; the rolled count is
kept as ``xla_rolled_gflop``), achieved GFLOP/s and its ratio to the best f32 matmul rate measured at the start
and end of the same run, XLA's memory estimate, and the speed-up over the official PyTorch figures from the issue. With
``--official-json`` (written by a side-by-side run of the official code) the measured official times are
printed beside ours too.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench import common, models  # noqa: E402

# Official PyTorch TokenFlow on the project's CPU machines (from the issue): s/img by batch, GFLOP/img.
ISSUE_FIGURES: dict[tuple[str, str], dict[str, Any]] = {
    ("b256e", "encode"): {"s_per_img": {1: 2.54, 4: 3.03}, "gflop": 187, "note": "b1 range 2.5-3.3"},
    ("b256e", "decode"): {"s_per_img": {1: 13.7, 4: 12.6}, "gflop": 1527, "note": "b1 range 13.7-15.2"},
    ("xl", "encode"): {"s_per_img": {1: 15.0, 2: 13.75}, "gflop": 1074, "note": ""},
    ("xl", "decode"): {"s_per_img": {1: 7.1}, "gflop": 804, "note": "batch not stated"},
}
GOALS = {"encode": 1.5, "decode": 1.0}  # required speed-up over the official figures
MEMORY_FRACTION = 0.6  # skip a batch whose XLA peak estimate exceeds this share of physical RAM


def issue_figure(variant: str, op: str, batch: int) -> tuple[float | None, int | None]:
    """(official s/img, the batch it was measured at): same batch if given, else the nearest smaller."""
    table = ISSUE_FIGURES[(variant, op)]["s_per_img"]
    candidates = [b for b in table if b <= batch] or sorted(table)
    b = max(candidates) if batch not in table else batch
    return table.get(b), b


def bench_op(built: models.Built, op: str, batch: int, quick: bool) -> dict[str, Any]:
    """Compiles, FLOP-counts and times one (op, batch) of a variant; returns its table row."""
    fn = models.encode_fn(built) if op == "encode" else models.decode_fn(built)
    x = (models.images(batch, built.image_size) if op == "encode"
         else models.features(batch, built.grid, built.code_dim))
    row: dict[str, Any] = dict(variant=built.name, op=op, batch=batch)
    jitted = jax.jit(fn)
    compiled, row["compile_s"] = common.compile_timed(jitted, built.variables, x)
    mem = common.memory_stats(compiled)
    row.update(temp_GiB=mem["temp_bytes"] / common.GiB, peak_GiB=mem["peak_estimate_bytes"] / common.GiB, memory=mem)
    if mem["peak_estimate_bytes"] > MEMORY_FRACTION * common.physical_memory_bytes():
        row["note"] = f"skipped: needs {row['peak_GiB']:.1f} GiB"
        return row
    flops = common.unrolled_flops(fn, built.variables, x)
    row["gflop_per_img"] = flops / batch / 1e9
    row["xla_rolled_gflop"] = common.xla_flops(compiled) / batch / 1e9
    first = common.time_fn(compiled, built.variables, x, warmup=0, repeats=1).median
    repeats = 1 if quick or first > 60 else 2 if first > 15 else 3
    timing = common.time_fn(compiled, built.variables, x, warmup=0, repeats=repeats)
    row.update(s_per_img=timing.median / batch, s_per_img_min=timing.min / batch, first_call_s=first,
               timing=timing.as_dict())
    row["gflops"] = row["gflop_per_img"] / row["s_per_img"]
    official, official_batch = issue_figure(built.name, op, batch)
    row["issue_s_per_img"] = official
    row["issue_batch"] = official_batch
    row["speedup_vs_issue"] = official / row["s_per_img"] if official else None
    row["goal"] = GOALS[op]
    return row


def add_official(rows: list[dict[str, Any]], path: str) -> None:
    """Adds the side-by-side measured official figures (bench JSON of /tmp/official_bench) to ``rows``."""
    with open(path) as f:
        official = json.load(f)
    by_key = {(r["variant"], r["op"], r["batch"]): r for r in official["rows"]}
    for row in rows:
        ref = by_key.get((row["variant"], row["op"], row["batch"]))
        if ref and "s_per_img" in row and ref.get("s_per_img"):
            row["official_s_per_img"] = ref["s_per_img"]
            row["speedup_vs_official"] = ref["s_per_img"] / row["s_per_img"]


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--variants", default="b256e,xl")
    parser.add_argument("--ops", default="encode,decode")
    parser.add_argument("--batches", default=None, help="e.g. 'b256e=1,4;xl=1,2,4' (default; --quick: 1 only)")
    parser.add_argument("--official-json", default=None, help="measured official figures to print beside ours")
    args = parser.parse_args()
    common.enable_compile_cache()

    batches = {"b256e": [1, 4], "xl": [1, 2, 4]}
    if args.quick:
        batches = {"b256e": [1], "xl": [1]}
    if args.batches:
        for part in args.batches.split(";"):
            name, _, values = part.partition("=")
            batches[name.strip()] = [int(b) for b in values.split(",")]
    info = common.machine_info()
    print(f"matmul f32 2048: {info['matmul_f32_2048_gflops']['median']:.0f} GFLOP/s (median), "
          f"{info['matmul_f32_2048_gflops']['best']:.0f} (best)", flush=True)

    rows: list[dict[str, Any]] = []
    for name in args.variants.split(","):
        built = models.build_variant(name)
        print(f"{name}: {built.param_count / 1e6:.0f} M parameters", flush=True)
        for op in args.ops.split(","):
            for batch in batches[name]:
                row = bench_op(built, op, batch, args.quick)
                rows.append(row)
                print(f"  {name} {op} batch {batch}: {common.fmt(row.get('s_per_img'))} s/img "
                      f"{row.get('note', '')}", flush=True)
                if "note" in row:  # too big: larger batches will not fit either
                    break
        del built

    # The yardstick is the best matmul call at the start or the end of the run: under other people's load
    # the median drops far more than the best does, and "fraction of peak" needs the undisturbed rate.
    info["matmul_f32_2048_gflops_end"] = common.matmul_gflops()
    matmul = max(info["matmul_f32_2048_gflops"]["best"], info["matmul_f32_2048_gflops_end"]["best"])
    info["matmul_yardstick_gflops"] = matmul
    for row in rows:
        if "gflops" in row:
            row["of_matmul"] = row["gflops"] / matmul
    if args.official_json:
        add_official(rows, args.official_json)
    columns = ["variant", "op", "batch", "s_per_img", "s_per_img_min", "gflop_per_img", "xla_rolled_gflop", "gflops",
               "of_matmul", "peak_GiB", "compile_s", "issue_s_per_img", "issue_batch", "speedup_vs_issue", "goal",
               "official_s_per_img", "speedup_vs_official", "note"]
    print()
    common.print_table(rows, columns, title=(
        f"TokenFlow encode/decode, float32, jit, eval; of_matmul: vs best f32 matmul {matmul:.0f} GFLOP/s; "
        "GFLOP from XLA cost analysis of the scan-unrolled program"))
    print("official figures from the issue (s/img by batch; GFLOP/img):")
    for (variant, op), fig in ISSUE_FIGURES.items():
        print(f"  {variant} {op}: {fig['s_per_img']} {fig['gflop']} GFLOP {fig['note']}")
    common.write_json("tokenizer", {"machine": info, "rows": rows, "issue_figures": {
        f"{v}/{o}": f for (v, o), f in ISSUE_FIGURES.items()}, "official_json": args.official_json}, args.out)


if __name__ == "__main__":
    main()
