"""Which part of TokenFlow's encode / decode dominates on CPU.

Times each part of a variant separately (jitted, float32, eval, random weights), with loop-corrected XLA
FLOPs and achieved GFLOP/s, and the whole encode / decode beside them so the sum of the parts can be
checked against the whole:

  encode = semantic_encoder (input scaling, ViT, encode_task_layer)
         + pixel_encoder (bicubic to the pixel resolution for xl, CNN encoder, quant_conv)
         + quantizer (9 or 15 scales of area resize, nearest-code search, bicubic upsampling)
  decode = semantic_decoder (BEiT decoder, decode_task_layer)
         + pixel_decoder (post_quant_conv, CNN decoder, bicubic back to 384 for xl)
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench import common, models  # noqa: E402
from tokenflow_jax.models import tokenizer  # noqa: E402
from tokenflow_jax.ops import resize  # noqa: E402


def semantic_encoder(m: tokenizer.TokenFlow, x: jax.Array) -> jax.Array:
    return m.encode_task_layer(m.semantic_encoder(tokenizer.scale_input(x, m.config.input_scaling)))


def pixel_encoder(m: tokenizer.TokenFlow, x: jax.Array) -> jax.Array:
    size = m.config.pixel_input_size
    if size != m.config.image_size:
        x = resize.bicubic_resize(x, (size, size))
    return m.quant_conv(m.pixel_encoder(x))


def quantizer(m: tokenizer.TokenFlow, h: jax.Array):
    return m.quantizer(h, train=False)


def semantic_decoder(m: tokenizer.TokenFlow, f: jax.Array) -> jax.Array:
    return m.decode_task_layer(m.semantic_decoder(f[..., : m.config.quantizer.semantic_dim]))


def pixel_decoder(m: tokenizer.TokenFlow, f: jax.Array) -> jax.Array:
    image = m.pixel_decoder(m.post_quant_conv(f[..., m.config.quantizer.semantic_dim :]))
    if m.config.pixel_input_size != m.config.image_size:
        image = resize.bicubic_resize(image, (m.config.image_size, m.config.image_size))
    return image


PARTS: dict[str, tuple[str, Callable[..., Any]]] = {
    # name: (input kind, function of (module, input))
    "semantic_encoder": ("image", semantic_encoder),
    "pixel_encoder": ("image", pixel_encoder),
    "quantizer": ("latent", quantizer),
    "encode (whole)": ("image", tokenizer.TokenFlow.encode),
    "semantic_decoder": ("features", semantic_decoder),
    "pixel_decoder": ("features", pixel_decoder),
    "decode (whole)": ("features", tokenizer.TokenFlow.decode),
}


def part_input(built: models.Built, kind: str, batch: int) -> jax.Array:
    if kind == "image":
        return models.images(batch, built.image_size)
    latent = models.features(batch, built.grid, built.code_dim)
    return latent * 3.0 if kind == "latent" else latent  # un-normalised encoder outputs vs quantised F


def bench_part(built: models.Built, name: str, batch: int, matmul: float, quick: bool) -> dict[str, Any]:
    kind, part = PARTS[name]
    x = part_input(built, kind, batch)
    fn = lambda v, x: built.model.apply(v, x, method=part)  # noqa: E731
    compiled, compile_s = common.compile_timed(jax.jit(fn), built.variables, x)
    gflop = common.unrolled_flops(fn, built.variables, x) / batch / 1e9
    first = common.time_fn(compiled, built.variables, x, warmup=0, repeats=1).median
    timing = common.time_fn(compiled, built.variables, x, warmup=0, repeats=1 if quick or first > 30 else 3)
    s = timing.median / batch
    mem = common.memory_stats(compiled)
    return dict(variant=built.name, part=name, batch=batch, s_per_img=s, s_per_img_min=timing.min / batch,
                gflop_per_img=gflop, gflops=gflop / s, of_matmul=gflop / s / matmul,
                temp_GiB=mem["temp_bytes"] / common.GiB, compile_s=compile_s, timing=timing.as_dict())


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--variants", default="b256e,xl")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--parts", default=",".join(PARTS))
    args = parser.parse_args()
    common.enable_compile_cache()
    info = common.machine_info()
    matmul = info["matmul_f32_2048_gflops"]["best"]  # best call: the least disturbed by other jobs
    print(f"matmul f32 2048: {matmul:.0f} GFLOP/s (best)", flush=True)
    rows = []
    for variant in args.variants.split(","):
        built = models.build_variant(variant)
        for name in args.parts.split(","):
            rows.append(bench_part(built, name, args.batch, matmul, args.quick))
            print(f"  {variant} {name}: {rows[-1]['s_per_img']:.3f} s/img", flush=True)
        for whole, parts in [("encode (whole)", ("semantic_encoder", "pixel_encoder", "quantizer")),
                             ("decode (whole)", ("semantic_decoder", "pixel_decoder"))]:
            got = {r["part"]: r for r in rows if r["variant"] == variant}
            if whole in got and all(p in got for p in parts):
                total = sum(got[p]["s_per_img"] for p in parts)
                for p in parts:
                    got[p]["share"] = got[p]["s_per_img"] / total
                got[whole]["share"] = got[whole]["s_per_img"] / total  # whole / sum of parts
        del built
    common.print_table(rows, ["variant", "part", "batch", "s_per_img", "s_per_img_min", "share", "gflop_per_img",
                              "gflops", "of_matmul", "temp_GiB", "compile_s"],
                       title=f"TokenFlow parts (share: of the sum of parts; for a whole: whole / sum); matmul "
                             f"{matmul:.0f} GFLOP/s")
    common.write_json("tokenizer_parts", {"machine": info, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
