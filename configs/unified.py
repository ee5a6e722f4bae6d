"""Unified configs: one decoder that generates images (next-scale) and answers questions (LLaVA style) on one
frozen TokenFlow tokenizer (models/unified.py). No official counterpart: the paper trains a separate model per
task (Llama-2-7B for text-to-image, Qwen2.5-14B for understanding).

Variants (``configs/unified.py:ARG``):
  tiny   the `tiny` t2i decoder shape (width 128, 4 layers) over the `tiny` tokenizer, trained from scratch on
         the built-in shapes captions (generation) and Shapes-VQA (understanding) with the word-level
         ``builtin:shapes_chat`` tokenizer, which covers both.
  7b     Llama-2-7B shape (the released t2i decoder: QK-norm, post-sublayer norm, the vocabulary extended by [PAD]
         and 32,768 image codes) on TokenFlow-B at 256 px, `vicuna_v1` chat template.
  14b    Qwen2.5-14B shape on TokenFlow-XL (the released understanding model's tokenizer), `qwen_2_5` template,
         the vocabulary extended by [PAD] and the XL codebook's codes.

Options: ``head=separate|extended`` (default: extended for 7b / 14b as the released t2i model, separate for tiny).

The two halves read the same sections as their own recipes do, under ``t2i`` and ``vlm`` where they differ:
``data.t2i`` is a t2i ``data`` section (captions with their images, or ``tokenized`` shards), ``data.vlm`` a
VLM one (``shapes_vqa`` or ``llava``); ``train.t2i_batch_size`` and ``train.vlm_batch_size`` split each step's
global batch; ``loss.t2i_weight`` and ``loss.vlm_weight`` weight the two losses. ``sample`` is the t2i
sampler's section (configs/sample.py's presets), ``generate`` the answer decoder's.
"""
from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import ConfigError

NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst "
    "quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)


def llm(width, depth, heads, kv_heads, mlp, vocab, *, qk_norm, block_order, theta=1e4, eps=1e-5, qkv_bias=False,
        max_positions=4096):
    return config_lib.ConfigDict(dict(
        vocab_size=vocab, width=width, depth=depth, num_heads=heads, num_kv_heads=kv_heads, mlp_dim=mlp,
        rope_theta=theta, norm_eps=eps, qk_norm=qk_norm, qk_norm_eps=1e-6, qkv_bias=qkv_bias,
        tie_embeddings=False, max_positions=max_positions, block_order=block_order,
        dtype="float32", param_dtype="float32", remat="none",
    ))


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, variant="tiny", head="")
    config = config_lib.ConfigDict()
    config.recipe = "unified"
    config.seed = 0
    m = config.model = config_lib.ConfigDict()
    if arg.variant == "tiny":
        tokenizer = "configs/tokenizer.py:tiny"
        head = arg.head or "separate"
        # vocab_size 0: the text tokenizer's size (+ [PAD] and the codes for head='extended').
        m.llm = llm(128, 4, 4, 2, 352, 0, qk_norm=True, block_order="pre_norm", max_positions=256)
        m.text_length = 24
        text = dict(tokenizer="builtin:shapes_chat", template="vicuna_v1", uncond_prompt="")
        t2i_data = dict(source="shapes", num_examples=100_000, path="", split="train", tokenized="", crop="",
                        skip_budget=4.0)
        vlm_data = dict(source="shapes_vqa", num_examples=100_000, max_length=128, aspect="square", path="",
                        image_root="", kinds=("count", "colour", "shape", "position", "exists", "caption"),
                        skip_budget=4.0)
        # The demo's separate models take 900 + 800 steps and see 900 x 16 captioned images and 800 x 32
        # conversations; 1,700 steps of 8 + 15 see 13,600 and 25,500: equal steps and examples. Measured against
        # them (docs/unified_tiny.md): 1,700 x (8 + 15) scores 24.2% / 30.0% ShapesEval and 49.2% Shapes-VQA,
        # 900 x (16 + 28) 15.0% / 20.8% and 48.0% (20.8% / 46.0% at lr 1.5e-3).
        train = dict(t2i_batch_size=8, vlm_batch_size=15, num_steps=1700, warmup_steps=100, log_every=25,
                     checkpoint_every=500, length_buckets=(96, 128))
        # The t2i tiny's sampling (configs/t2i.py: CFG 30 since the figures above, measured at CFG 3).
        sample = dict(cfg_scale=30.0, top_k=(64, 16, 1), top_p=(0.8, 0.8, 0.0))
        lr, mesh, max_new_tokens = 1e-3, (-1, 1, 1), 16
    elif arg.variant in ("7b", "14b"):
        head = arg.head or "extended"
        official = dict(qk_norm=True, block_order="post_sublayer_norm")  # the released t2i decoder's block
        if arg.variant == "7b":
            tokenizer, codes, text_vocab = "configs/tokenizer.py:b,res=256,enhanced", 32768, 32000
            m.llm = llm(4096, 32, 32, 32, 11008, 0, **official)  # Llama-2-7B
            init, template = "meta-llama/Llama-2-7b-hf", "vicuna_v1"
        else:
            tokenizer, codes, text_vocab = "configs/tokenizer.py:xl", 32768, 152064
            m.llm = llm(5120, 48, 40, 8, 13824, 0, theta=1e6, eps=1e-6, qkv_bias=True, max_positions=32768,
                        **official)  # Qwen2.5-14B
            init, template = "Qwen/Qwen2.5-14B-Instruct", "qwen_2_5"
        m.llm.vocab_size = text_vocab + (1 + codes if head == "extended" else 0)
        m.llm.dtype = "bfloat16"
        m.llm.remat = "full"
        m.text_length = 131
        text = dict(tokenizer=init, template=template, uncond_prompt=NEGATIVE_PROMPT)
        t2i_data = dict(source="folder", num_examples=0, path="", split="train", tokenized="", crop="",
                        skip_budget=4.0)
        vlm_data = dict(source="llava", num_examples=0, max_length=2048, aspect="pad", path="", image_root="",
                        kinds=(), skip_budget=4.0)
        train = dict(t2i_batch_size=128, vlm_batch_size=128, num_steps=100_000, warmup_steps=2000, log_every=50,
                     checkpoint_every=1000, length_buckets=(512, 1024, 1536, 2048))
        sample = dict(cfg_scale=7.5, top_k=(1200, 100, 1), top_p=(0.8, 0.8, 0.0))
        lr, mesh, max_new_tokens = 2e-5, (1, -1, 1), 512
        m.init = init
    else:
        raise ConfigError(f"unknown unified variant {arg.variant!r}; expected tiny, 7b or 14b")
    m.head = head
    m.features = "final"  # what understanding reads: final | final_semantic | all_scales (models/vlm.py)
    m.init = m.get("init", "")  # HF Llama / Qwen2 id or folder: the decoder (vocabulary extended as needed)
    # Checkpoint folders of this project's t2i or VLM runs (or unified ones): each parameter found in them is
    # loaded, the rest initialised as their recipe does; the log lists which is which.
    m.init_checkpoints = ()
    config.tokenizer = config_lib.ConfigDict(dict(config=tokenizer, overrides=[], checkpoint=""))
    config.text = config_lib.ConfigDict(dict(image_marker="<img>", **text))
    # skip_budget (each stream): unusable records tolerated per batch element while looking for a usable one
    # (tokenflow_jax/data/replacement.py); t2i crop: 'adm' | 'center' ('' = center for shapes, adm otherwise).
    config.data = config_lib.ConfigDict(dict(t2i=t2i_data, vlm=vlm_data, num_workers=0))
    config.loss = config_lib.ConfigDict(dict(t2i_weight=1.0, vlm_weight=1.0))
    config.optim = config_lib.ConfigDict(dict(lr=lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
                                          schedule="constant", warmup_steps=train.pop("warmup_steps")))
    config.train = config_lib.ConfigDict(dict(cond_drop_rate=0.1, trainable=(), frozen=(), keep_checkpoints=3,
                                          async_checkpoints=True, **train))
    config.sample = config_lib.ConfigDict(sample)
    config.generate = config_lib.ConfigDict(dict(max_new_tokens=max_new_tokens, temperature=0.0, top_k=0,
                                                 top_p=0.0, batch_size=64))
    config.mesh = config_lib.ConfigDict(dict(shape=mesh, axes=("data", "fsdp", "tensor"), num_devices=0))
    return config
