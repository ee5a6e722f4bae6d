"""Batch generation with a trained next-scale t2i model (``tokenflow-jax generate``; the reference is
ByteFlow-AI/TokenFlow ``t2i/llava_t2i/eval/run_llava_samples.py``).

Variants (``configs/sample.py:ARG``) match ``configs/t2i.py``: tiny, 1b, 7b. The model (and its image
tokenizer) are the ones recorded in the ``--checkpoint`` run; ``model_config`` only serves checkpoints
that record none. Guidance is CFG with the reference's linear ramp over scales; each pass of the multi-step
strategy samples top-k then top-p (top-k above K is clipped).

Sampling presets (``preset=NAME``), named for where each comes from:
  paper            3 passes per scale, top-k [1200, 100, 1], top-p [0.8, 0.8, 0], CFG 7.5: the paper's best
                   strategy (Table 6) and its "#Steps 25" (Table 4; 1 + 8 x 3 model runs). The CFG value is the
                   official script's; the paper does not state one. Default of 1b and 7b: it is the setting of
                   the reported GenEval 0.55.
  official_script  1 pass, top-k 600, top-p 0.6, CFG 7.5: what the released sampling script runs by default
                   (ByteFlow-AI/TokenFlow ``t2i/scripts/run_t2i.sh``: ``--cfg 7.5 --loop 1``), 9 model runs,
                   so ~2.8x fewer forward passes than ``paper``.
``tiny`` defaults to its own setting (CFG 30, top-k [64, 16, 1], top-p [0.8, 0.8, 0], tuned on the shapes
world with K = 1,024; ``configs/t2i.py`` has the CFG measurements); either preset applies to it too. ``loops``
(1, 2, 3) picks the official script's strategy table at the variant's CFG: 1 -> [600] / [0.6], 2 -> [1200, 1] /
[0.8, 0], 3 -> [1200, 100, 1] / [0.8, 0.8, 0].

  tokenflow-jax generate --config configs/sample.py:tiny --checkpoint RUN/checkpoints --prompts FILE \\
      --out DIR [--per-prompt 4] [--seed 0] [--config.sample.cfg_scale=5.0] [--config.sample.loops=1]

FILE: one prompt per line (``.txt``), or JSON lines with a ``prompt`` field (``.jsonl``).
"""
import os

from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import ConfigError

PRESETS = {
    "paper": dict(cfg_scale=7.5, top_k=(1200, 100, 1), top_p=(0.8, 0.8, 0.0)),
    "official_script": dict(cfg_scale=7.5, top_k=(600,), top_p=(0.6,)),
}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, variant="tiny", loops=0, preset="")
    t2i = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"t2i.py:{arg.variant}"))
    preset = arg.preset or ("" if arg.variant == "tiny" else "paper")
    if preset and preset not in PRESETS:
        raise ConfigError(f"configs/sample.py: unknown preset {preset!r}; known: {sorted(PRESETS)}")
    chosen = PRESETS[preset] if preset else dict(t2i.sample)
    config = config_lib.ConfigDict()
    config.recipe = "sample"
    config.model_config = f"configs/t2i.py:{arg.variant}"  # used only when the checkpoint records no config
    config.tokenizer_checkpoint = ""  # default: the t2i run's config.tokenizer.checkpoint
    s = config.sample = config_lib.ConfigDict()
    s.preset = preset  # recorded in the manifest; '' = the variant's own setting
    s.cfg_scale = float(chosen["cfg_scale"])
    s.loops = int(arg.loops)  # 0: use top_k / top_p below; 1, 2, 3: the official script's strategy table
    s.top_k = tuple(chosen["top_k"])
    s.top_p = tuple(chosen["top_p"])
    s.uncond_prompt = t2i.text.uncond_prompt  # the unconditional branch's prompt (7b: the negative prompt)
    s.cached = True  # KV-cached sampler (same codes as the full recompute)
    config.seed = 0
    config.per_prompt = 4
    config.batch_size = 16 if arg.variant == "tiny" else 64  # images per sampler call, over all devices
    # Image (i, j) is drawn with key fold_in(fold_in(seed, i), j): the same image whatever the batching.
    config.grid = True  # one PNG grid per prompt
    config.mesh = config_lib.ConfigDict(dict(shape=(-1, 1, 1) if arg.variant == "tiny" else (1, -1, 1),
                                         axes=("data", "fsdp", "tensor"), num_devices=0))
    return config
