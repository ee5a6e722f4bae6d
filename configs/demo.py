"""The quick-start demo (``tokenflow-jax demo --workdir DIR``): the whole system on built-in data.

One run trains the `tiny` tokenizer on the procedural shapes set, tokenizes the set, trains the `tiny`
text-to-image model and the `tiny` VLM on those tokens and features, and evaluates each (reconstruction
quality, ShapesEval for single- and multi-step sampling, Shapes-VQA). The sizes below are chosen so the whole
demo takes about 20 minutes on a 2-core CPU machine; every stage is an ordinary run of the recipe's config,
so any field can be overridden (``--config.t2i.num_steps=4000``, ``--config.t2i.overrides='("...",)'``).

Tokenizer recipe for the time budget: the `tiny` config with the GAN and LPIPS off (neither is computed when
its weight is 0) and the VGG16 teacher at stride 8 (relu4_3 at 64 px instead of relu5_3 at 128 px), a step
about 3x cheaper than the default `tiny` step; the semantic teacher is still a real pretrained network. The
pixel loss is L1: without LPIPS, L2 leaves soft blobs where the shapes' edges should be (ShapesEval of the
reconstructions after 300 steps: 11.7% with L1, 5.0% with L2; loss-updated codebook, lr 1e-3: with lr 3e-3 the
codebook use collapsed to 2%, EMA codebooks scored 1.7%).
"""
from configs import common


def get_config(arg=None):
    del arg
    config = common.ConfigDict()
    config.recipe = "demo"
    config.seed = 0
    config.tokenizer = common.ConfigDict(dict(
        config="configs/tokenizer.py:tiny", num_steps=900, checkpoint_every=100,
        overrides=("--config.loss.disc_weight=0", "--config.loss.lpips_weight=0", "--config.teacher.stride=8",
                   "--config.loss.recon=l1"),
    ))
    # Reconstruction metrics on held-out (validation-split) shapes; no rFID (InceptionV3 at 299 px is the
    # slowest part of an evaluation on CPU and means little for flat synthetic shapes).
    config.tokenizer_eval = common.ConfigDict(dict(num_images=256, batch_size=32, grid_images=8))
    config.tokenize = common.ConfigDict(dict(num_images=10_000))
    config.t2i = common.ConfigDict(dict(config="configs/t2i.py:tiny", num_steps=1500, checkpoint_every=250,
                                        overrides=()))
    # ShapesEval: prompts per GenEval category, sampling strategies (passes per scale) to compare; then a
    # grid of `per_prompt` samples for each of `grid_prompts` held-out prompts with the last strategy.
    config.shapes_eval = common.ConfigDict(dict(config="configs/sample.py:tiny", num_per_category=20, loops=(1, 3),
                                                grid_prompts=8, per_prompt=4, overrides=()))
    config.vlm = common.ConfigDict(dict(config="configs/vlm.py:tiny", num_steps=600, checkpoint_every=100,
                                        overrides=()))
    config.vqa = common.ConfigDict(dict(num_per_category=50))
    return config
