"""The quick-start demo (``tokenflow-jax demo --workdir DIR``): the whole system on built-in data.

One run trains the `tiny` tokenizer on the procedural shapes set, tokenizes the set, trains the `tiny`
text-to-image model and the `tiny` VLM on those tokens and features, and evaluates each (reconstruction
quality, ShapesEval for single- and multi-step sampling, Shapes-VQA). The sizes below make the whole demo take
~25 minutes on a 2-core CPU machine whose f32 matmul runs at ~210 GFLOP/s (the run below; ~33 at 150 and ~15 at
490 by the previous recipe's times on such machines); every stage is an ordinary run of the recipe's config, so
any field can be overridden (``--config.t2i.num_steps=4000``, ``--config.t2i.overrides='("...",)'``).

Tokenizer recipe for the time budget (``TOKENIZER_RECIPE``): the `tiny` config with the GAN off
(``disc_weight=0``: the discriminator is not computed at all), LPIPS on AlexNet instead of VGG16 (~10x fewer
FLOPs), the VGG16 teacher at stride 4 (relu3_3 of the image at 32 px, 256-d: 0.38 GFLOP per image against 2.13 for
relu4_3 at 64 px and ~10 for the `tiny` default relu5_3 at 128 px), the pixel CNNs at width 16 instead of 32, EMA
codebook updates with dead-code restarts, and a cosine learning rate from 2e-3 after 100 warmup steps. Step:
~0.28 s for 8 images on 2 cores at ~210 GFLOP/s (0.37 s with the relu4_3 teacher, of which the teacher took 0.10).
The text-to-image model trains 900 steps at a constant lr 1.5e-3 (the `tiny` default is 5e-4; a cosine decay to 0
scored 29.4% / 27.5% on the evaluation prompts and 28.6% / 25.3% on held-out ones against 36.7% / 31.9% and
37.2% / 35.3%), the VLM 800 steps at lr 1e-3 (cosine, its config's); ShapesEval samples at CFG 30
(``configs/t2i.py`` has its choice; on this recipe's t2i model CFG 20-80 are within noise on held-out prompts).

Measured 2026-12-05 on one machine (AMD EPYC, 2 cores, ~210 GFLOP/s), seed 0; PSNR / LPIPS on 256 held-out scenes,
ShapesEval on 360 prompts (ceiling: the tokenizer's own reconstructions), Shapes-VQA on 750 questions:

    tokenizer recipe                          steps  min    PSNR   LPIPS  codes  ShapesEval 1/3-step (ceiling) VQA
    relu4_3, codebook loss, constant lr 1e-3   3000   19.5   29.08  0.127   38%   17.5/16.7 at CFG 3 (70.0%)    48.4%
      (the previous recipe; t2i 900 constant)                                     35.6/31.7 at CFG 30
    the same, cosine lr 2e-3                   1500   10.1   28.28  0.174   21%   34.2/34.2 (44.2%) *           43.3% **
    relu3_3, EMA codebook, cosine lr 2e-3      2000   ~9.5   28.77  0.166   96%   28.3/30.0 (57.2%) *           48.0%
    the same, t2i 900 steps cosine             3000   15.0   29.78  0.124   96%   29.4/27.5 (71.1%)             46.7%
    the same, t2i 900 constant (this recipe)   3000   15.0   29.78  0.124   96%   36.7/31.9 (71.1%)             46.7%
    * t2i 600 steps (cosine); ** VLM 500 steps. ~9.5: 2,000 x 0.28 s (12.1 measured while other jobs shared the
    machine). Whole demo: 30.6, 17.6, 21.9 (shared), 25.3 and 24.8 min (the last re-ran only the t2i and ShapesEval
    stages on the same tokenizer, with ShapesEval's sampler compile cached: ~25.1 min cold).

The standard errors are ~2.5 points on ShapesEval and ~1.8 on Shapes-VQA: the CFG change and the t2i schedule are
the downstream differences beyond noise; the tokenizer figures are the clear gain (codes used, PSNR, LPIPS at
0.77x the time).

Measurements with the previous recipe (relu4_3 teacher, codebook loss, constant lr; ShapesEval at CFG 3), on a
faster machine of this kind. ShapesEval of the tokenizer's own reconstructions, 300 prompts:

    steps                               1400/1500   2100    2700    3000
    that recipe (pixel CNN width 16)       48.7%    62.0%   65.7%   71.3%   (~4.8 steps/s)
    the same at width 32                   35.3%    (1400 steps, ~2.3 steps/s)
    tiny defaults (VGG LPIPS, relu5_3 teacher): 22.5% at 1000, 58.3% at 2000 (~1.1 steps/s; 120 prompts)
    no LPIPS, L2 / L1: 14.2% / 11.7% (L1 collapses colours; 120 prompts)

Text-to-image on that tokenizer (120 prompts, chance 11.7%): 25.8% / 30.8% single- / 3-step after 900 steps
at lr 1.5e-3 (the `tiny` default is 5e-4); 1,800 steps add little (20.8% / 32.5%). The VLM's Shapes-VQA
(chance 32.4%): 51.2% after 800 steps; 48.0% after 1,200, 39.2% at lr 2.5e-3 and 30.0% without the caption
examples, so 800 steps at lr 1e-3 with captions stay. Those figures came from 120 prompts and 250 questions, whose
standard errors (~4 and ~3 points) are as large as the differences above: the same t2i checkpoint scores 25.3% /
28.1% on 360 prompts. So the demo scores 60 prompts per category (360; ~20 s per strategy on 2 cores) and 150
questions per category (750).
"""
from tokenflow_jax import config as config_lib

# The tokenizer stage's overrides of configs/tokenizer.py:tiny (see the module docstring).
TOKENIZER_RECIPE = (
    "--config.loss.disc_weight=0", "--config.loss.lpips_net=alexnet",
    "--config.teacher.stride=4", "--config.model.semantic_out_dim=256",
    "--config.model.pixel_encoder.ch=16", "--config.model.pixel_decoder.ch=16",
    "--config.quantizer.codebook_update=ema",
    "--config.optim.lr=2e-3", "--config.optim.schedule=cosine",
)


def get_config(arg=None):
    del arg
    config = config_lib.ConfigDict()
    config.recipe = "demo"
    config.seed = 0
    config.tokenizer = config_lib.ConfigDict(dict(
        config="configs/tokenizer.py:tiny", num_steps=3000, checkpoint_every=100, overrides=TOKENIZER_RECIPE,
        warmup_steps=100))  # the cosine schedule's warmup, cut to num_steps in shorter runs
    # Reconstruction metrics on held-out (validation-split) shapes; no rFID (InceptionV3 at 299 px is the
    # slowest part of an evaluation on CPU and means little for flat synthetic shapes).
    # semantic=True adds the semantic features' cosine to the teacher (the ablation studies read it).
    config.tokenizer_eval = config_lib.ConfigDict(dict(num_images=256, batch_size=32, grid_images=8, semantic=False))
    config.tokenize = config_lib.ConfigDict(dict(num_images=10_000))
    config.t2i = config_lib.ConfigDict(dict(config="configs/t2i.py:tiny", num_steps=900, checkpoint_every=100,
                                        overrides=("--config.optim.lr=1.5e-3",)))
    # ShapesEval: prompts per GenEval category, sampling strategies (passes per scale) to compare; then a
    # grid of `per_prompt` samples for each of `grid_prompts` held-out prompts with the last strategy.
    config.shapes_eval = config_lib.ConfigDict(dict(config="configs/sample.py:tiny", num_per_category=60, loops=(1, 3),
                                                grid_prompts=8, per_prompt=4, overrides=()))
    config.vlm = config_lib.ConfigDict(dict(config="configs/vlm.py:tiny", num_steps=800, checkpoint_every=100,
                                        overrides=()))
    config.vqa = config_lib.ConfigDict(dict(num_per_category=150))
    return config
