"""Understanding-model speed: prefill and decode tokens/s with and without the KV cache, and the training
step's model FLOP utilisation.

On the `tiny` VLM's shapes (configs/vlm.py:tiny: width 128, 4 layers, 64 image tokens) and a reduced
`qwen14b` (the real width 5120, heads 40/8 GQA, MLP 13824 and vocabulary 152,064, cut to 1 of its 48
layers), random weights, float32:

  * prefill: one forward over a batch of B prompts of P tokens (image placeholders included) filling the
    cache; tokens/s = B P / time;
  * decode, cached: ``models/vlm_generate.AnswerDecoder.batch`` generating N new tokens per row (one prefill +
    N cached steps, stop ids disabled); decode tokens/s counts only the new tokens, after the prefill;
  * decode, no cache: ``full_recompute`` (every new token re-runs the whole sequence), same tokens;
  * train step (tiny only by default): forward + backward + Adam of the whole model with the frozen tokenizer
    encoding the images in the step, at the config's global batch and longest bucket.

Model FLOPs are analytic (2 x multiply-adds of every matmul, attention included; the tokenizer's encode is
counted in the train step from XLA's cost analysis of the encode alone); MFU is against the f32 matmul
rate measured in the same run.

    python bench/vlm.py [--quick] [--configs tiny,qwen14b-reduced] [--batch 4] [--new-tokens 32] [--out F]
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
from tokenflow_jax.models import transformer, vlm  # noqa: E402
from tokenflow_jax.models.vlm_generate import AnswerDecoder, full_recompute  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(llm=dict(vocab_size=120, width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=352,
                          max_positions=512), image_tokens=64, prompt=96),
    "qwen14b-reduced": dict(llm=dict(vocab_size=152064, width=5120, depth=1, num_heads=40, num_kv_heads=8,
                                     mlp_dim=13824, qkv_bias=True, rope_theta=1e6, max_positions=2048),
                            image_tokens=729, prompt=800),
}


def build(name: str) -> tuple[vlm.VLMConfig, int]:
    spec = CONFIGS[name]
    cfg = vlm.VLMConfig(llm=transformer.TransformerConfig(**spec["llm"]), feature_dim=40,
                        num_image_tokens=spec["image_tokens"])
    return cfg, spec["prompt"]


def forward_flops(cfg: vlm.VLMConfig, tokens: int, keys: int, logits: int) -> float:
    """Matmul FLOPs of one decoder call over ``tokens`` positions attending ``keys``, unembedding ``logits``."""
    llm = cfg.llm
    d, h, kv, dh = llm.width, llm.num_heads, llm.num_kv_heads, llm.head_dim
    layer = d * h * dh * 2 + 2 * d * kv * dh + 3 * d * llm.mlp_dim
    return 2 * (llm.depth * tokens * layer + logits * d * llm.vocab_size) + llm.depth * 4 * tokens * keys * h * dh


def inputs(cfg: vlm.VLMConfig, batch: int, prompt: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.llm.vocab_size, size=(batch, prompt)).astype(np.int32)
    ids[:, 4 : 4 + cfg.num_image_tokens] = vlm.IMAGE_TOKEN_INDEX
    mask = np.ones((batch, prompt), np.int32)
    features = jnp.asarray(rng.normal(size=(batch, cfg.num_image_tokens, cfg.feature_dim)).astype(np.float32))
    return ids, mask, features


def bench_decode(name: str, batch: int, new_tokens: int, repeats: int, with_full: bool) -> dict[str, Any]:
    cfg, prompt = build(name)
    model = vlm.VLM(cfg)
    ids, mask, features = inputs(cfg, batch, prompt)
    params = jax.jit(lambda k: nn.unbox(model.init(k, ids[:, :8], features))["params"])(jax.random.key(0))
    row: dict[str, Any] = {"config": name, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
                           "params_M": cfg.llm.num_params() / 1e6}
    gen = AnswerDecoder(model, max_new_tokens=new_tokens, stop_ids=[], pad_id=0)
    prefill = jax.jit(gen._prefill_fn)
    t_prefill = common.time_fn(prefill, params, ids, mask, features, warmup=1, repeats=repeats)
    row["prefill_s"] = t_prefill.median
    row["prefill_tok_s"] = batch * prompt / t_prefill.median
    row["prefill_gflop"] = batch * forward_flops(cfg, prompt, prompt, 1) / 1e9
    t_gen = common.time_fn(lambda: gen.batch(params, ids, mask, features), warmup=1, repeats=repeats)
    decode_s = max(t_gen.median - t_prefill.median, 1e-9)
    row["cached_total_s"] = t_gen.median
    row["cached_decode_tok_s"] = batch * new_tokens / decode_s
    cached_flops = sum(forward_flops(cfg, 1, prompt + t + 1, 1) for t in range(new_tokens)) * batch
    row["cached_decode_gflop"] = cached_flops / 1e9
    row["cached_decode_gflops"] = cached_flops / decode_s / 1e9
    cached_tokens = np.asarray(gen.batch(params, ids, mask, features)[0])
    if with_full:
        t_full = common.time_fn(lambda: full_recompute(model, params, ids, mask, features, new_tokens),
                                warmup=1, repeats=max(1, repeats // 2))
        row["full_total_s"] = t_full.median
        row["full_decode_tok_s"] = batch * new_tokens / t_full.median
        length = prompt + new_tokens  # the fixed buffer each step re-runs; one position is unembedded
        full_flops = new_tokens * batch * forward_flops(cfg, length, length, 1)
        row["full_gflop"] = full_flops / 1e9
        row["full_gflops"] = full_flops / t_full.median / 1e9
        row["decode_speedup"] = t_full.median / t_gen.median
        full_tokens = full_recompute(model, params, ids, mask, features, new_tokens)
        row["identical_tokens"] = bool(np.array_equal(full_tokens, cached_tokens))
    return row


def bench_train(repeats: int) -> dict[str, Any]:
    """The tiny VLM's real train step (configs/vlm.py:tiny, random tokenizer), at its batch and bucket."""
    from tokenflow_jax import config as config_common
    from tokenflow_jax.recipes.vlm import setup as vlm_setup
    from tokenflow_jax.recipes.vlm import train as vlm_train
    from tokenflow_jax.recipes.vlm.train import TrainState
    from tokenflow_jax.train import optim

    config = config_common.load_config("configs/vlm.py:tiny")
    tok_model, tok_vars, tok_config = vlm_setup.load_image_tokenizer(config)
    tokenizer = vlm_setup.text_tokenizer(config)
    cfg = vlm_setup.model_config(config, tok_config, tokenizer)
    model = vlm.VLM(cfg)
    b, length = int(config.train.global_batch_size), int(config.data.max_length)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.llm.vocab_size, size=(b, length)).astype(np.int32)
    ids[:, 4 : 4 + cfg.num_image_tokens] = vlm.IMAGE_TOKEN_INDEX
    labels = np.where(np.arange(length)[None] > length - 8, ids, -100).astype(np.int32)
    size = int(tok_config.model.image_size)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, size=(b, size, size, 3)).astype(np.float32)),
             "input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels),
             "attention_mask": jnp.ones((b, length), jnp.int32)}
    params = nn.unbox(model.init(jax.random.key(0), ids[:1, :8], jnp.zeros((1, cfg.num_image_tokens, cfg.feature_dim))))
    params = params["params"]
    tx, labels_tree = optim.make_optimizer(config.optim, params, config.train.trainable, config.train.frozen)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(vlm_train.make_train_step(config, model, tok_model, tx, labels_tree))
    compiled, compile_s = common.compile_timed(step, state, tok_vars, batch)
    timing = common.time_fn(lambda: compiled(state, tok_vars, batch), warmup=1, repeats=repeats)
    encode = jax.jit(lambda v, x: vlm.visual_features(tok_model, v, x, "final"))
    encode_flops = common.xla_flops(encode.lower(tok_vars, batch["image"]).compile())
    model_flops = 3 * b * forward_flops(cfg, length, length, length) + encode_flops  # fwd + 2x bwd, frozen encode
    memory = common.memory_stats(compiled)
    return {"config": "tiny (train step)", "batch": b, "length": length, "params_M": cfg.llm.num_params() / 1e6,
            "compile_s": compile_s, "step_s": timing.median, "examples_per_s": b / timing.median,
            "tokens_per_s": b * length / timing.median, "step_gflop": model_flops / 1e9,
            "step_gflops": model_flops / timing.median / 1e9, "temp_MiB": memory.get("temp_bytes", 0) / 2**20}


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,qwen14b-reduced", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="skip the tiny train step")
    args = parser.parse_args()
    common.enable_compile_cache()
    names = common.config_names(parser, args.configs, CONFIGS)
    repeats = 1 if args.quick else args.repeats
    matmul_start = common.matmul_gflops()
    rows = []
    for name in names:
        rows.append(bench_decode(name, args.batch, args.new_tokens, repeats, with_full=True))
        common.print_table(rows[-1:], ["config", "prefill_tok_s", "cached_decode_tok_s", "full_decode_tok_s",
                                       "decode_speedup", "identical_tokens"])
    train_row = None if args.no_train else bench_train(repeats)
    rate = max(matmul_start["best"], common.matmul_gflops()["best"])
    for row in rows:
        row["matmul_gflops"] = rate
        row["cached_decode_mfu"] = row["cached_decode_gflops"] / rate
        row["full_mfu"] = row.get("full_gflops", 0.0) / rate
        row["prefill_mfu"] = row["prefill_gflop"] / row["prefill_s"] / rate
    print()
    common.print_table(rows, ["config", "batch", "prompt", "new_tokens", "params_M", "prefill_tok_s", "prefill_mfu",
                              "cached_decode_tok_s", "cached_decode_mfu", "full_decode_tok_s", "full_mfu",
                              "decode_speedup", "identical_tokens"],
                       title="VLM prefill and decode, float32, random weights (decode speed-up = whole generate call)")
    if train_row:
        train_row["matmul_gflops"] = rate
        train_row["mfu"] = train_row["step_gflops"] / rate
        common.print_table([train_row], ["config", "batch", "length", "params_M", "compile_s", "step_s",
                                         "examples_per_s", "tokens_per_s", "step_gflop", "mfu", "temp_MiB"],
                           title="VLM train step (forward + backward + Adam, frozen tokenizer encode in the step)")
    common.write_json("vlm", {"machine": common.machine_info(matmul_start), "rows": rows, "train": train_row},
                      args.out)


if __name__ == "__main__":
    main()
