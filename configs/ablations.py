"""Research studies on the shapes world (``tokenflow-jax sweep --config configs/ablations.py:NAME --workdir DIR``).

Each study is a list of points; a point is the demo's pipeline (configs/demo.py, shortened below) with its own
tokenizer overrides, run as ordinary resumable runs in ``DIR/points/<point>`` and evaluated; ``DIR/results.json``,
``DIR/results.md`` and PNG plots are then written from the points' own files. ``--point I`` runs point I alone
(a cluster runs the points side by side; a final run without ``--point`` collects them).

Studies (``configs/ablations.py:NAME``):
  w_dis          the shared mapping's pixel weight: 0 (semantic only), 0.1, 0.3, 1, 3, 10, and pixel only
                 (``quantizer.mapping=pixel_only``, the w_dis -> infinity limit). Per point: PSNR, LPIPS, the
                 semantic cosine to the teacher, codes used and perplexity per scale, ShapesEval and Shapes-VQA of
                 short fixed-length t2i and VLM runs on its tokens.
  codebook_size  K = 1,024 ... 1,048,576 (x4), each with the codebook loss and with the EMA update with dead-code
                 restarts: codes used and perplexity per scale, PSNR, step time and the train step's compiled
                 memory (arguments: parameters and optimiser state; temporaries: everything else).
  mapping        shared mapping vs separate argmins per codebook vs pixel-only VQ, downstream included.
  scales         the multi-scale schedule (1, 2, 4, 6, 8) vs the final grid alone (8,), the same token count at the
                 final scale: reconstruction and understanding only (a single scale is not next-scale generation,
                 so the t2i stages are not run).
  smoke          two points of the w_dis study with every stage a few steps (tests; a pipeline check).

Sizes: each study is meant to fit about an hour on a 2-core CPU (estimated from the demo's throughput, ~150
GFLOP/s; the tokenizer 1,000 steps instead of the demo's 3,000, t2i 300 and VLM 300 steps, the demo's evaluations).
At real scale, override the tokenizer config and data of every point, e.g.
``--config.demo.tokenizer.config=configs/tokenizer.py:b --config.demo.tokenizer.overrides='("--config.data.source=tfds",
"--config.data.name=imagenet2012")'`` (the point's own overrides are added after these).

Every point's settings are fixed by its first run (its folder holds its checkpoints): change a study and delete
the points whose settings changed.
"""
from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import ConfigError

# The stages a point can run (tokenflow_jax/apps/sweep.py): the demo's, plus the train step's compiled memory.
RECONSTRUCTION = ("tokenizer", "tokenizer_eval", "step_cost")
GENERATION = ("tokenize", "t2i", "shapes_eval")
UNDERSTANDING = ("vlm", "vqa")

STUDIES = ("w_dis", "codebook_size", "mapping", "scales", "smoke")
STUDY_TOKENIZER_RECIPE = (
    "--config.loss.disc_weight=0", "--config.loss.lpips_net=alexnet", "--config.teacher.stride=8",
    "--config.model.pixel_encoder.ch=16", "--config.model.pixel_decoder.ch=16",
)


def _q(field, value):
    return f"--config.quantizer.{field}={value!r}"


def points(study):
    """(name, tokenizer overrides, x for the plots or None, series) of every point of ``study``: points that share a
    series are one line over x in the plots; x None is a point without a position on the axis (a bar, or a dashed
    level beside the line)."""
    if study in ("w_dis", "smoke"):
        weights = (0, 0.1, 0.3, 1, 3, 10) if study == "w_dis" else (0, 1)
        out = tuple((f"w_dis={w:g}", (_q("w_dis", float(w)),), float(w), "shared mapping") for w in weights)
        return out + ((("pixel_only", (_q("mapping", "pixel_only"),), None, "pixel only"),) if study == "w_dis" else ())
    if study == "codebook_size":
        return tuple((f"K={k}_{update}", (_q("codebook_size", k), _q("codebook_update", update)), float(k),
                      f"{update} update") for update in ("loss", "ema") for k in (1024, 4096, 16384, 65536, 262144,
                                                                                  1048576))
    if study == "mapping":
        return tuple((m, (_q("mapping", m),), None, m) for m in ("shared", "separate", "pixel_only"))
    if study == "scales":
        return (("multi_scale", (_q("scales", (1, 2, 4, 6, 8)),), None, "scales (1, 2, 4, 6, 8)"),
                ("single_scale", (_q("scales", (8,)),), None, "scale (8,) alone"))
    raise ConfigError(f"unknown study {study!r} in configs/ablations.py; expected one of {', '.join(STUDIES)}")


def get_config(arg=None):
    study = arg or ""
    config = config_lib.ConfigDict()
    config.recipe = "sweep"
    config.study = study
    config.seed = 0
    config.points = points(study)  # validates the name
    # The demo pipeline every point runs, at study length, with the recipe the studies' results (docs/ablations.md)
    # were measured with: the demo's before its 2026-12 speed-up (tokenizer: VGG16 relu4_3 teacher, codebook
    # loss, constant lr 1e-3 without warmup; t2i: constant lr; ShapesEval at CFG 3). Drop the next three lines
    # for the current recipe.
    demo = config_lib.load_config("configs/demo.py")
    demo.tokenizer.update(overrides=STUDY_TOKENIZER_RECIPE, warmup_steps=0)
    demo.t2i.overrides = ("--config.optim.lr=1.5e-3",)
    demo.shapes_eval.overrides = ("--config.sample.cfg_scale=3.0",)
    demo.tokenizer.num_steps = 1000
    demo.tokenizer_eval.update(num_images=256, semantic=True)
    demo.tokenize.num_images = 4000
    demo.t2i.num_steps = 300
    # Evaluations at the demo's size (360 ShapesEval prompts, 750 questions; ~1 min a point): with 60 prompts and
    # 100 questions the standard errors (~6 and ~5 points) would hide most differences between points.
    demo.shapes_eval.grid_prompts = 4
    demo.shapes_eval.per_prompt = 2
    demo.vlm.num_steps = 300
    config.stages = RECONSTRUCTION + GENERATION + UNDERSTANDING
    if study == "codebook_size":
        # Reconstruction and codebook statistics only; the large K points make the step slower (the search over
        # K codes), so the tokenizer trains 600 steps.
        config.stages = RECONSTRUCTION
        demo.tokenizer.num_steps = 600
    elif study == "scales":
        config.stages = RECONSTRUCTION + UNDERSTANDING
    elif study == "smoke":
        demo.tokenizer.update(num_steps=3, checkpoint_every=1)
        demo.tokenizer.overrides = (*demo.tokenizer.overrides, "--config.train.log_every=1",
                                    "--config.train.image_every=0")
        demo.tokenizer_eval.update(num_images=8, batch_size=8, grid_images=2)
        demo.tokenize.num_images = 32
        demo.t2i.update(num_steps=2, checkpoint_every=2, overrides=("--config.train.log_every=1",))
        demo.shapes_eval.update(num_per_category=1, grid_prompts=1, per_prompt=1)
        demo.vlm.update(num_steps=2, checkpoint_every=2, overrides=("--config.train.log_every=1",))
        demo.vqa.num_per_category = 1
    demo.seed = config.seed
    config.demo = demo
    return config
