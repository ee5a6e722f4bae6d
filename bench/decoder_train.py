"""Decoder train-step speed: the text-to-image and VLM recipes' jitted update, examples/s and the fraction of
the machine's f32 matmul rate it reaches.

The step timed is each trainer's own, built by the recipe's own set-up code: ``recipes/t2i/train.build_step``
(``(state, codebook, batch) -> (state, metrics)``) and ``recipes/vlm/train.build_step`` (``(state, tokenizer
variables, batch) -> (state, metrics)``, the frozen image tokenizer encoding the batch inside the step), each
``loop.build_step``'s ``jax.jit`` with the run's shardings and the state donated, called under the run's mesh
and logical-axis rules as the trainers call it: one forward, one backward, the optimizer's update (AdamW,
clipping). Random weights (the recipe's own initialisation), a fixed random batch, float32, no remat.

Configs (``--configs``):
  t2i-tiny         ``configs/t2i.py:tiny`` (5 scales, 121 image tokens, text prefix 24), its batch of 16.
  t2i-1b-reduced   ``configs/t2i.py:1b`` (TinyLlama shape: width 2048, GQA 32/4, MLP 5632; 9 scales, 817 image
                   tokens after a 131-token prefix, L = 947; 'separate' head over K = 32,768 codes) cut to 2 of
                   its 22 layers, float32, remat off.
  vlm-tiny         ``configs/vlm.py:tiny`` (width 128, 4 layers, 64 image tokens of the tiny tokenizer), batch 32 at
                   the longest bucket (128).
  vlm-1b-reduced   ``configs/vlm.py:vicuna13b`` (TokenFlow-B features at 224 px, 196 image tokens, Llama
                   vocabulary 32,000) with its decoder set to the same TinyLlama shape, 2 layers, float32, remat
                   off, sequences of 512; every parameter trained (stage 2).
The VLM labels train the last quarter of each row (the replies of a conversation); the t2i batch is every
image token of random codes under random captions (a few left-padded).

FLOPs: XLA's cost analysis of the step with every scan unrolled (``common.unrolled_flops``). Fraction of the
matmul rate = FLOPs per step / seconds per step / the best 2048^3 f32 matmul rate measured in the same run (at
the start and at the end). Memory: XLA's estimate for the compiled step (arguments + outputs + temporaries -
donated aliases) and the process's peak RSS.

``--profile NAME``: per-XLA-op wall time of one config's step (``xla_profile.op_times``), printed by op and by
kind, and written with the rows.

    python bench/decoder_train.py [--quick] [--configs t2i-tiny,t2i-1b-reduced,vlm-tiny,vlm-1b-reduced]
                                  [--batch t2i-1b-reduced=4] [--profile t2i-1b-reduced] [--out FILE]
"""
from __future__ import annotations

import os
import sys
from typing import Any

if "--profile" in sys.argv:  # XLA's per-thunk trace events; must be set before the backend starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from tokenflow_jax import config as config_lib  # noqa: E402
from tokenflow_jax import prng  # noqa: E402
from tokenflow_jax.train import loop, optim  # noqa: E402

TINYLLAMA_REDUCED = ["model.llm.width=2048", "model.llm.depth=2", "model.llm.num_heads=32", "model.llm.num_kv_heads=4",
                     "model.llm.mlp_dim=5632", "model.llm.vocab_size=32000"]
F32 = ["model.llm.dtype='float32'", "model.llm.param_dtype='float32'", "model.llm.remat='none'"]
CONFIGS: dict[str, tuple[str, str, list[str], int]] = {
    # name: (recipe, config spec, overrides, batch)
    "t2i-tiny": ("t2i", "configs/t2i.py:tiny", [], 16),
    "t2i-1b-reduced": ("t2i", "configs/t2i.py:1b", ["model.llm.depth=2"] + F32, 2),
    "vlm-tiny": ("vlm", "configs/vlm.py:tiny", [], 32),
    "vlm-1b-reduced": ("vlm", "configs/vlm.py:vicuna13b", TINYLLAMA_REDUCED + F32 + [
        "data.max_length=512", "train.length_buckets=(512,)", "model.init=''"], 2),
}
TARGET = 0.35  # issue 20: decoder train steps at >= 35% of the measured f32 matmul rate


def load(name: str, batch: int, extra: tuple[str, ...] = ()):
    recipe, spec, overrides, _ = CONFIGS[name]
    config = config_lib.apply_overrides(config_lib.load_config(spec),
                                        overrides + [f"train.global_batch_size={batch}", *extra])
    return recipe, config


def t2i_parts(config, batch: int, mesh, rules):
    """(Step, the raw update fn, its inputs after the state, tokens per step) of the t2i recipe."""
    from tokenflow_jax.models import t2i
    from tokenflow_jax.recipes.t2i import setup as t2i_setup
    from tokenflow_jax.recipes.t2i import train as t2i_train
    from tokenflow_jax.recipes.tokenizer import frozen as frozen_tokenizer

    tok_config = frozen_tokenizer.tokenizer_config(config)
    text_tokenizer = t2i_setup.text_parts(config)[0] if not int(config.model.llm.vocab_size) else None
    cfg = t2i_setup.model_config(config, tok_config, text_tokenizer)
    model = t2i.NextScaleT2I(cfg)
    step = t2i_train.build_step(config, model, mesh, rules)
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((cfg.codebook_size, cfg.code_dim)).astype(np.float32)
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    p, n = cfg.text_length, cfg.num_tokens
    text_ids = rng.integers(3, min(cfg.llm.vocab_size, 32000), size=(batch, p)).astype(np.int32)
    text_mask = np.ones((batch, p), np.int32)
    text_mask[: batch // 2, : p // 3] = 0  # half the captions left-padded to a third
    batch_dict = {"text_ids": jnp.asarray(text_ids), "text_mask": jnp.asarray(text_mask),
                  "indices": jnp.asarray(rng.integers(0, cfg.codebook_size, size=(batch, n)).astype(np.int32))}
    raw = t2i_train.make_train_step(config, model, step.tx)
    return step, raw, (jnp.asarray(codebook), batch_dict), batch * cfg.sequence_length, cfg.llm


def vlm_parts(config, batch: int, mesh, rules):
    """(Step, the raw update fn, its inputs after the state, tokens per step) of the VLM recipe."""
    from tokenflow_jax.models import vlm
    from tokenflow_jax.recipes.vlm import setup as vlm_setup
    from tokenflow_jax.recipes.vlm import train as vlm_train

    tok_model, tok_vars, tok_config = vlm_setup.load_image_tokenizer(config, mesh)
    tokenizer = vlm_setup.text_tokenizer(config) if not int(config.model.llm.vocab_size) else None
    cfg = vlm_setup.model_config(config, tok_config, tokenizer)
    model = vlm.VLM(cfg)
    step = vlm_train.build_step(config, model, tok_model, mesh, rules)
    length, t = int(config.data.max_length), cfg.num_image_tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.llm.vocab_size, size=(batch, length)).astype(np.int32)
    ids[:, 4 : 4 + t] = vlm.IMAGE_TOKEN_INDEX
    labels = np.where(np.arange(length)[None] >= length - length // 4, ids, -100).astype(np.int32)
    size = int(tok_config.model.image_size)
    batch_dict = {"image": jnp.asarray(rng.uniform(-1, 1, size=(batch, size, size, 3)).astype(np.float32)),
                  "input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels),
                  "attention_mask": jnp.ones((batch, length), jnp.int32)}
    raw = vlm_train.make_train_step(config, model, tok_model, step.tx, step.labels)
    return step, raw, (tok_vars, batch_dict), batch * length, cfg.llm


def bench_config(name: str, repeats: int, batch: int | None, profile: bool, top: int,
                 extra: tuple[str, ...] = (), legacy: bool = False) -> dict[str, Any]:
    batch = batch or CONFIGS[name][3]
    recipe, config = load(name, batch, extra)
    mesh, rules = loop.mesh_and_rules(config)
    parts = t2i_parts if recipe == "t2i" else vlm_parts
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step, raw, inputs, tokens, llm = parts(config, batch, mesh, rules)
        state = jax.jit(step.init_state, out_shardings=step.state_sh)(prng.make_key(0))
        trained, total = optim.count_trainable(state.params, step.labels)
        flops = common.unrolled_flops(raw, state, *inputs)
        compiled, compile_s = common.compile_timed(step.step_fn, state, *inputs)
        memory = common.memory_stats(compiled)
        holder = {"state": state}

        def run():
            holder["state"], metrics = compiled(holder["state"], *inputs)
            return metrics["loss"]

        timing = common.time_fn(run, warmup=1, repeats=repeats)
        loss = float(run())
        row = {
            "config": name, "recipe": recipe, "batch": batch, "tokens": tokens, "params_M": total / 1e6,
            "trained_M": trained / 1e6, "width": llm.width, "depth": llm.depth, "vocab": llm.vocab_size,
            "compile_s": compile_s, "step_s": timing.median, "step_s_min": timing.min,
            "examples_per_s": batch / timing.median, "tokens_per_s": tokens / timing.median,
            "gflop_per_step": flops / 1e9, "gflops": flops / timing.median / 1e9, "loss_after": loss,
            "peak_estimate_GiB": memory.get("peak_estimate_bytes", 0) / common.GiB,
            "temp_GiB": memory.get("temp_bytes", 0) / common.GiB, "peak_rss_GiB": common.peak_rss_bytes() / common.GiB,
            "memory": memory, "timing": timing.as_dict(),
        }
        if legacy:
            row.update(compare_legacy(parts, config, batch, mesh, rules, state_holder=holder, compiled=compiled,
                                      inputs=inputs, repeats=repeats, flops=flops))
        if profile:
            from bench import xla_profile

            ops, wall = xla_profile.op_times(compiled.as_text(), run, repeats=1)
            ops.sort(key=lambda r: -r["ms"])
            summary = xla_profile.summarise(ops, wall)
            print()
            common.print_table([r for r in ops if r["kind"] != "loop"][:top],
                               ["op", "kind", "calls", "ms", "gflops", "detail"],
                               title=f"{name} batch {batch}: top XLA ops (traced call {wall:.2f} s)")
            common.print_table(summary, ["kind", "ms", "share_of_ops", "share_of_wall", "gflop", "gflops"],
                               title="by kind")
            row["profile"] = {"wall_s": wall, "ops": ops[:200], "summary": summary}
    return row


def compare_legacy(parts, config, batch, mesh, rules, *, state_holder, compiled, inputs, repeats, flops):
    """The pre-issue-20 step (``decoder_train_legacy.legacy_paths``) and the current one, called alternately on
    one state: their times, the speed-up (median of the per-pair ratios) and the legacy program's FLOPs and
    memory."""
    import statistics
    import time

    from bench import decoder_train_legacy

    with decoder_train_legacy.legacy_paths():
        old_step, old_raw, _, _, _ = parts(config, batch, mesh, rules)
        old_flops = common.unrolled_flops(old_raw, state_holder["state"], *inputs)
        old_compiled, _ = common.compile_timed(old_step.step_fn, state_holder["state"], *inputs)
    old_memory = common.memory_stats(old_compiled)
    times: dict[str, list[float]] = {"legacy": [], "current": []}
    programs = {"legacy": old_compiled, "current": compiled}
    for i in range(repeats + 1):  # the first pair warms the legacy program up
        for label in (("legacy", "current") if i % 2 == 0 else ("current", "legacy")):
            t0 = time.perf_counter()
            state_holder["state"], metrics = programs[label](state_holder["state"], *inputs)
            common.block(metrics)
            times[label].append(time.perf_counter() - t0)
    legacy_s, current_s = times["legacy"][1:], times["current"][1:]
    ratios = [a / b for a, b in zip(legacy_s, current_s)]
    return {"legacy_step_s": statistics.median(legacy_s), "legacy_step_s_min": min(legacy_s),
            "paired_step_s": statistics.median(current_s), "paired_step_s_min": min(current_s),
            "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
            "legacy_gflop_per_step": old_flops / 1e9, "legacy_gflops": old_flops / statistics.median(legacy_s) / 1e9,
            "paired_gflops": flops / statistics.median(current_s) / 1e9,
            "legacy_peak_estimate_GiB": old_memory.get("peak_estimate_bytes", 0) / common.GiB,
            "paired_times": times}


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", default="t2i-tiny,t2i-1b-reduced,vlm-tiny,vlm-1b-reduced",
                        help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", action="append", default=[], metavar="NAME=N",
                        help="batch size for a config, e.g. --batch t2i-1b-reduced=4 (default: the CONFIGS table)")
    parser.add_argument("--profile", default="", help="comma-separated configs to profile per XLA op")
    parser.add_argument("--top", type=int, default=30, help="profiled ops to print")
    parser.add_argument("--label", default="", help="a tag written into every row (e.g. before / after)")
    parser.add_argument("--compare-legacy", action="store_true",
                        help="also time the pre-issue-20 step (bench/decoder_train_legacy.py), calls alternating")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every config, e.g. --set model.llm.remat=full")
    args = parser.parse_args()
    common.enable_compile_cache()
    names = common.config_names(parser, args.configs, CONFIGS)
    profiled = set(common.config_names(parser, args.profile, CONFIGS)) if args.profile else set()
    repeats = 2 if args.quick else args.repeats
    batches = {k.strip(): int(v) for k, _, v in (b.partition("=") for b in args.batch)}

    load_start = os.getloadavg()[0]
    matmul_start = common.matmul_gflops()
    rows = []
    for name in names:
        row = bench_config(name, repeats, batches.get(name), name in profiled, args.top, tuple(args.set),
                           args.compare_legacy)
        row["label"], row["overrides"] = args.label, args.set
        rows.append(row)
        common.print_table([row], ["config", "batch", "step_s", "examples_per_s", "gflop_per_step", "gflops"])
    matmul_end = common.matmul_gflops()
    rate = max(matmul_start["best"], matmul_end["best"])  # the undisturbed rate, as bench/tokenizer_train.py
    for row in rows:
        row["matmul_gflops"] = rate
        row["mfu"] = row["gflops"] / rate
        row["mfu_best"] = row["gflop_per_step"] / row["step_s_min"] / rate
        row["target_mfu"] = TARGET
        if "legacy_step_s" in row:
            row["legacy_mfu"] = row["legacy_gflops"] / rate
            row["paired_mfu"] = row["paired_gflops"] / rate
    print()
    if any("legacy_step_s" in row for row in rows):
        common.print_table(rows, ["config", "batch", "legacy_step_s", "paired_step_s", "speedup",
                                  "legacy_gflop_per_step", "gflop_per_step", "matmul_gflops", "legacy_mfu",
                                  "paired_mfu",
                                  "legacy_peak_estimate_GiB", "peak_estimate_GiB"],
                           title="before (legacy code paths) and after, alternating call by call on one state")
    common.print_table(rows, ["config", "label", "batch", "tokens", "params_M", "compile_s", "step_s", "step_s_min",
                              "examples_per_s", "tokens_per_s", "gflop_per_step", "gflops", "matmul_gflops", "mfu",
                              "mfu_best", "peak_estimate_GiB", "peak_rss_GiB"],
                       title="decoder train steps (forward + backward + AdamW), float32")
    info = common.machine_info(matmul_start)
    info["load_average_1m_start"] = load_start  # machine_info's own reading is the end's
    common.write_json("decoder_train", {"machine": info, "matmul_end": matmul_end, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
