"""Batch generation with a trained next-scale t2i model (``tokenflow-jax generate``, SPEC 5.7).

Variants (``configs/sample.py:ARG``) match ``configs/t2i.py``: tiny, 1b, 7b. The model (and its image
tokenizer) are the ones recorded in the ``--checkpoint`` run; ``model_config`` only serves checkpoints
that record none. The sampling defaults come from that t2i variant: CFG 3.0 / 7.5 with the linear ramp over
scales, top-k then top-p per pass of the multi-step strategy (``loops`` picks the reference's presets:
1 -> [600] / [0.6], 2 -> [1200, 1] / [0.8, 0], 3 -> [1200, 100, 1] / [0.8, 0.8, 0]; top-k above K is clipped).

  tokenflow-jax generate --config configs/sample.py:tiny --checkpoint RUN/checkpoints --prompts FILE \\
      --out DIR [--per-prompt 4] [--seed 0] [--config.sample.cfg_scale=5.0] [--config.sample.loops=1]

FILE: one prompt per line (``.txt``), or JSON lines with a ``prompt`` field (``.jsonl``).
"""
from configs import common
from configs import t2i as t2i_configs


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="tiny", loops=0)
    t2i = t2i_configs.get_config(arg.variant)
    config = common.ConfigDict()
    config.recipe = "sample"
    config.model_config = f"configs/t2i.py:{arg.variant}"  # used only when the checkpoint records no config
    config.tokenizer_checkpoint = ""  # default: the t2i run's config.tokenizer.checkpoint
    s = config.sample = common.ConfigDict()
    s.cfg_scale = float(t2i.sample.cfg_scale)
    s.loops = int(arg.loops)  # 0: use top_k / top_p below; 1, 2, 3: the reference's strategy presets
    s.top_k = tuple(t2i.sample.top_k)
    s.top_p = tuple(t2i.sample.top_p)
    s.uncond_prompt = t2i.text.uncond_prompt  # the unconditional branch's prompt (7b: the negative prompt)
    s.cached = True  # KV-cached sampler (same codes as the full recompute)
    config.seed = 0
    config.per_prompt = 4
    config.batch_size = 16 if arg.variant == "tiny" else 64  # images per sampler call, over all devices
    # Image (i, j) is drawn with key fold_in(fold_in(seed, i), j): the same image whatever the batching.
    config.grid = True  # one PNG grid per prompt
    config.mesh = common.ConfigDict(dict(shape=(-1, 1, 1) if arg.variant == "tiny" else (1, -1, 1),
                                         axes=("data", "fsdp", "tensor"), num_devices=0))
    return config
