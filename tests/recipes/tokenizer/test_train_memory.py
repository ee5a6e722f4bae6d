"""The tokenizer train step's memory beyond the codebooks is flat in the codebook size K: compiled (not run) at two
K on one device, XLA's temporaries may grow only by what a larger codebook needs in any case.

What may grow, per extra code (a row of D = 40 floats, 4 bytes each):
  * loss update: the codebook loss's gradient (one [K, D] buffer: one gather of every scale's codes, one
    scatter-add); the optimiser's update before it is applied ([K, D]; Adam's moments are updated in place);
  * EMA update: the restart candidates (one encoder output per code, [K, D], since any code may be dead);
  * both: the normalised codebook the code search and lookups read ([K, D], once per step for every scale),
    and a few [K] vectors (row norms, usage ages, counts, the restart draws).
Before every scale's codes were gathered at once, each scale had its own [K, D] gradient, normalisation backward
and [K] histogram: the quantizer step below grew by 303 floats per code with the loss update and 121 with the EMA
update (3 scales; 93 and 78 now), against the 144 and 104 allowed here.

The default test compiles the quantizer's part of the step (the only part that sees K) with Adam; the slow one the
whole `tiny` tokenizer train step.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from tokenflow_jax import config as config_lib
from tokenflow_jax import prng
from tokenflow_jax.models import quantizer as qm
from tokenflow_jax.recipes.tokenizer import train as trainer
from tokenflow_jax.train import loop

CODE_DIM = 40
VECTORS = 24  # [K] float / int vectors allowed beside the [K, D] buffers
ALLOWED_FLOATS_PER_CODE = {"loss": 3 * CODE_DIM + VECTORS, "ema": 2 * CODE_DIM + VECTORS}
SMALL_K, LARGE_K = 1024, 65536


def quantizer_step_temp_bytes(codebook_size: int, update: str, scales=(1, 2, 4), batch: int = 8) -> int:
    """Temporaries of one jitted quantizer update: forward in training mode, gradient of a reconstruction-like loss
    plus the VQ terms, Adam on the codebooks, the usage / EMA state written back; state donated like the trainer's."""
    module = qm.MultiScaleQuantizer(qm.QuantizerConfig(codebook_size=codebook_size, scales=scales,
                                                       codebook_update=update))
    h = jax.ShapeDtypeStruct((batch, scales[-1], scales[-1], CODE_DIM), jnp.float32)
    variables = jax.eval_shape(lambda: nn.unbox(module.init(prng.make_key(0), jnp.zeros(h.shape))))
    tx = optax.adam(1e-3)
    params = variables.get("params", {})

    def step(params, opt_state, state, h):
        def loss(params):
            (f, aux, _), new_state = module.apply({"params": params, "quantizer": state}, h, train=True,
                                                  rngs={"quantizer": prng.make_key(1)}, mutable=["quantizer"])
            return jnp.mean((f - h) ** 2) + aux["vq_loss"] + aux["commit_loss"], new_state["quantizer"]

        (_, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_state

    lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, jax.eval_shape(tx.init, params),
                                                            variables["quantizer"], h)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def check_growth(growth: int, update: str, what: str) -> None:
    allowed = ALLOWED_FLOATS_PER_CODE[update] * 4 * (LARGE_K - SMALL_K)
    assert growth <= allowed, (f"{what}, {update} update: temporaries grew by {growth / 2**20:.1f} MiB from "
                               f"K={SMALL_K} to K={LARGE_K}, more than the {allowed / 2**20:.1f} MiB a larger "
                               "codebook needs")


@pytest.mark.parametrize("update", ["loss", "ema"])
def test_quantizer_step_temporaries_are_flat_in_the_codebook_size(update):
    growth = quantizer_step_temp_bytes(LARGE_K, update) - quantizer_step_temp_bytes(SMALL_K, update)
    check_growth(growth, update, "quantizer step")


# The whole step on a reduced `tiny` (32 px, scales 1, 2, 4), without teacher, LPIPS or discriminator: they do not
# touch the codebook and only slow the compile.
SMALL_TOKENIZER = [
    "mesh.num_devices=1", "model.image_size=32", "data.image_size=32", "model.semantic_encoder.pos_grid=4",
    "model.semantic_decoder.pos_grid=4", "quantizer.scales=(1, 2, 4)", "train.global_batch_size=8",
    "model.pixel_encoder.ch=16", "model.pixel_decoder.ch=16",
    "loss.semantic_weight=0", "loss.lpips_weight=0", "loss.disc_weight=0",
]


def train_step_temp_bytes(codebook_size: int, update: str) -> int:
    config = config_lib.apply_overrides(config_lib.load_config("configs/tokenizer.py:tiny"), SMALL_TOKENIZER + [
        f"quantizer.codebook_size={codebook_size}", f"quantizer.codebook_update={update!r}"])
    mesh, rules = loop.mesh_and_rules(config)
    program = trainer.aot_programs(config, mesh, rules)[0]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = program.fn.lower(*program.args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("update", ["loss", "ema"])
def test_train_step_temporaries_are_flat_in_the_codebook_size(update):
    growth = train_step_temp_bytes(LARGE_K, update) - train_step_temp_bytes(SMALL_K, update)
    check_growth(growth, update, "tokenizer train step")
