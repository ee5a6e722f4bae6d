"""Next-scale sampling speed: the KV-cached sampler against the reference's full recompute.

Both samplers (``tokenflow_jax.models.t2i_sampler``) run the multi-step CFG loop (3 passes per scale,
top-k [1200, 100, 1] clipped to K, top-p [0.8, 0.8, 0]) on random weights at the 9-scale 256 px schedule
(1, 2, 4, 6, 8, 10, 12, 14, 16: 817 tokens, 25 forward passes), batch B prompts (2B rows with the
unconditional branch). Reported per config: images/s of each, the speed-up, the decoder positions each
runs per image (``forward_tokens``), the model FLOPs of each (``decoder_flops``: the matmuls the sampler
runs) and their rate against the f32 matmul rate measured in the same run (MFU), and whether the two
produced identical codes (the head is sharpened x20, see bench_config).
The tokenizer's decode is not included (it is the same for both).

Configs:
  tiny        configs/t2i.py:tiny's decoder (width 128, 4 layers) with the 9-scale schedule, K = 1024.
  1b-reduced  the 1b decoder's width and heads (2048, 32/4 GQA, MLP 5632) cut to 2 of its 22 layers,
              K = 32768, text length 128 (the reference's prefix).

    python bench/sample.py [--quick] [--configs tiny,1b-reduced] [--batch 2] [--out FILE]

``--filter-only`` times just the top-k/top-p filter and the draw (``sampling.top_k_top_p_filter``,
``sampling.sample``) on random guided logits of the last scale (``FILTER_SHAPES``: [B, 256, K]) for the
schedule's sampled passes, against the generic full-sort path a static top_k took before, and checks
that both give the same bits.
"""
from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from tokenflow_jax.models import t2i, t2i_sampler, transformer  # noqa: E402
from tokenflow_jax.ops import sampling  # noqa: E402

SCALES_256 = (1, 2, 4, 6, 8, 10, 12, 14, 16)
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(llm=dict(vocab_size=300, width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=352,
                          qk_norm=True, max_positions=1024), codebook_size=1024, text_length=24),
    "1b-reduced": dict(llm=dict(vocab_size=32000, width=2048, depth=2, num_heads=32, num_kv_heads=4, mlp_dim=5632,
                                qk_norm=True, norm_eps=1e-5, max_positions=2048),
                       codebook_size=32768, text_length=128),
}
FILTER_SHAPES = ((1, 256, 32768), (2, 256, 1024))  # [B, tokens of the 16x16 scale, K]
HEAD_SHARPEN = 20.0
TARGET_SPEEDUP = 5.0  # issue 5: >= 5x faster than full recompute, identical output


def build(name: str) -> t2i.T2IConfig:
    spec = CONFIGS[name]
    return t2i.T2IConfig(llm=transformer.TransformerConfig(**spec["llm"]), scales=SCALES_256,
                         codebook_size=spec["codebook_size"], text_length=spec["text_length"])


def inputs(config: t2i.T2IConfig, batch: int):
    rng = np.random.default_rng(0)
    p, k = config.text_length, config.codebook_size
    codebook = rng.normal(size=(k, config.code_dim)).astype(np.float32)
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    text_ids = rng.integers(3, config.llm.vocab_size, size=(batch, p)).astype(np.int32)
    text_mask = np.ones((batch, p), np.int32)
    text_mask[:, : p // 2] = 0  # half-length captions, left-padded
    uncond_ids = np.zeros((batch, p), np.int32)
    uncond_mask = np.zeros((batch, p), np.int32)
    uncond_ids[:, -1], uncond_mask[:, -1] = 1, 1
    return jnp.asarray(codebook), text_ids, text_mask, uncond_ids, uncond_mask


def decoder_flops(config: t2i.T2IConfig, schedule: sampling.SamplingSchedule, cached: bool) -> float:
    """Model FLOPs per image (cond + uncond rows): 2 x multiply-adds of every matmul the sampler runs.

    Per forward call over T positions attending S keys: the projections and SwiGLU MLP of every layer
    (2 T x their weights), attention scores and values (2 x 2 T S H Dh per layer), the projector on image
    inputs, for both rows; and the code head once per sampled position (it runs on the guided hidden state).
    XLA's cost analysis is not used for this: it counts a cumulative sum over V (the top-p cut) as V^2
    additions, ~1,750 phantom GFLOP per image.
    """
    llm = config.llm
    d, h, kv, dh = llm.width, llm.num_heads, llm.num_kv_heads, llm.head_dim
    layer = d * h * dh * 2 + 2 * d * kv * dh + 3 * d * llm.mlp_dim
    head = d * config.codebook_size  # either head: only the K code logits are computed
    projector = config.code_dim * d + d * d
    p, offsets, scales = config.text_length, config.token_offsets, config.scales

    def call(tokens: int, keys: int, image_inputs: int, predicted: int) -> float:
        attention = 2 * 2 * tokens * keys * h * dh
        rows = 2 * (2 * (llm.depth * (tokens * layer) + image_inputs * projector) + llm.depth * attention)
        return rows + 2 * predicted * head  # the cond and the uncond row; the head once

    total = call(p, p, 0, 1)
    for si in range(1, len(scales)):
        block, end = scales[si] ** 2, p - 1 + offsets[si + 1]
        per_pass = call(block, end, block, block) if cached else call(end, end, end - p, block)
        total += per_pass * len(schedule.passes(si))
    return total


def bench_config(name: str, batch: int, repeats: int) -> dict[str, Any]:
    config = build(name)
    k = config.codebook_size
    schedule = sampling.SamplingSchedule(tuple(min(x, k) for x in sampling.DEFAULT_TOP_K), sampling.DEFAULT_TOP_P)
    model = t2i.NextScaleT2I(config)
    codebook, text_ids, text_mask, uncond_ids, uncond_mask = inputs(config, batch)
    codes = jnp.take(codebook, jnp.zeros((batch, config.num_tokens), jnp.int32), axis=0)
    variables = jax.jit(model.init)(jax.random.key(0), text_ids, text_mask, codes)
    # Random-init logits are nearly flat, and float32 rounding differences between the two samplers'
    # matmul shapes then flip near-tied draws (one flip changes everything after it). A trained model is
    # far more peaked; scaling the head by HEAD_SHARPEN mimics that, so `identical_codes` compares the
    # algorithms. (Timing does not depend on the weights.)
    params = dict(variables["params"])
    params["code_head"] = jax.tree.map(lambda x: x * HEAD_SHARPEN, params["code_head"])
    variables = {"params": params}
    args = (variables, codebook, text_ids, text_mask, uncond_ids, uncond_mask, jax.random.key(1))
    row: dict[str, Any] = {"config": name, "batch": batch, "params_M": config.llm.num_params() / 1e6,
                           "tokens": config.num_tokens, "passes": schedule.num_forward_passes(len(config.scales))}
    outputs = {}
    for label, cached in (("cached", True), ("full", False)):
        sample = t2i_sampler.make_sampler(model, cfg_scale=7.5, schedule=schedule, cached=cached)
        flops = batch * decoder_flops(config, schedule, cached)
        compiled, compile_s = common.compile_timed(sample, *args)
        timing = common.time_fn(compiled, *args, warmup=1, repeats=repeats)
        outputs[label] = np.asarray(compiled(*args))
        row.update({
            f"{label}_compile_s": compile_s, f"{label}_s": timing.median, f"{label}_s_min": timing.min,
            f"{label}_img_per_s": batch / timing.median,
            f"{label}_positions": t2i_sampler.forward_tokens(config, schedule, cached),
            f"{label}_gflop_per_img": flops / batch / 1e9, f"{label}_gflops": flops / timing.median / 1e9,
        })
    row["speedup"] = row["full_s"] / row["cached_s"]
    row["speedup_best"] = row["full_s_min"] / row["cached_s_min"]
    row["position_ratio"] = row["full_positions"] / row["cached_positions"]
    row["identical_codes"] = bool(np.array_equal(outputs["cached"], outputs["full"]))
    row["code_agreement"] = float(np.mean(outputs["cached"] == outputs["full"]))
    row["target_speedup"] = TARGET_SPEEDUP
    return row


def bench_filter(shape: tuple[int, ...], top_k: int, top_p: float, repeats: int) -> dict[str, Any]:
    logits = jnp.asarray(3.0 * np.random.default_rng(0).standard_normal(shape), jnp.float32)
    key = jax.random.key(0)
    # The generic path (a stable sort of the whole vocabulary for top-p), which every static top_k took before.
    full_sort = jax.jit(lambda x: sampling._top_p_mask(sampling._top_k_mask(x, top_k), top_p))
    fns = {"full_sort": full_sort, "filter": jax.jit(lambda x: sampling.top_k_top_p_filter(x, top_k, top_p)),
           "sample": jax.jit(lambda x: sampling.sample(key, x, top_k, top_p))}
    row: dict[str, Any] = {"shape": "x".join(map(str, shape)), "top_k": top_k, "top_p": top_p}
    for label, fn in fns.items():
        row[f"{label}_ms"] = common.time_fn(fn, logits, warmup=1, repeats=repeats).median * 1e3
    row["speedup"] = row["full_sort_ms"] / row["filter_ms"]
    want, got = np.asarray(full_sort(logits)), np.asarray(fns["filter"](logits))
    row["identical"] = bool(np.array_equal(want.view(np.uint32), got.view(np.uint32)))
    return row


def filter_only(args) -> None:
    rows = []
    for shape in FILTER_SHAPES:
        for top_k, top_p in zip(sampling.DEFAULT_TOP_K, sampling.DEFAULT_TOP_P):
            if top_k != 1:  # top_k == 1 is an argmax
                rows.append(bench_filter(shape, min(top_k, shape[-1]), top_p, 1 if args.quick else args.repeats))
    common.print_table(rows, ["shape", "top_k", "top_p", "full_sort_ms", "filter_ms", "sample_ms", "speedup",
                              "identical"], title="top-k/top-p filter and draw, float32")
    common.write_json("sample_filter", {"machine": common.machine_info(), "rows": rows}, args.out)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,1b-reduced", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--batch", type=int, default=2, help="prompts per call (2x rows with the uncond branch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--filter-only", action="store_true", help="time only the top-k/top-p filter and the draw")
    args = parser.parse_args()
    common.enable_compile_cache()
    if args.filter_only:
        return filter_only(args)
    names = common.config_names(parser, args.configs, CONFIGS)
    repeats = 1 if args.quick else args.repeats

    matmul_start = common.matmul_gflops()
    rows = []
    for name in names:
        rows.append(bench_config(name, args.batch, repeats))
        common.print_table(rows[-1:], ["config", "cached_s", "full_s", "speedup", "identical_codes"])
    matmul_end = common.matmul_gflops()
    rate = max(matmul_start["best"], matmul_end["best"])
    for row in rows:
        row["matmul_gflops"] = rate
        for label in ("cached", "full"):
            row[f"{label}_mfu"] = row[f"{label}_gflops"] / rate
    print()
    common.print_table(rows, ["config", "batch", "params_M", "passes", "cached_s", "full_s", "cached_img_per_s",
                              "full_img_per_s", "speedup", "speedup_best", "cached_positions", "full_positions",
                              "position_ratio", "cached_gflop_per_img", "full_gflop_per_img", "cached_mfu",
                              "full_mfu", "identical_codes", "code_agreement", "target_speedup"],
                       title="next-scale sampling (9 scales, 3 passes, CFG), float32, random weights")
    common.write_json("sample", {"machine": common.machine_info(matmul_start), "matmul_end": matmul_end,
                                 "rows": rows}, args.out)


if __name__ == "__main__":
    main()
