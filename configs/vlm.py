"""LLaVA-style understanding configs on TokenFlow features (ByteFlow-AI/TokenFlow ``i2t/llava``).

Variants (``configs/vlm.py:ARG``):
  tiny        CPU-sized decoder trained from scratch on the built-in Shapes-VQA set (questions on count,
              colour, shape, position, with exact answers) and shapes captions, over the `tiny` tokenizer's
              8x8 feature grid (64 image tokens) with the word-level ``builtin:shapes_chat`` text tokenizer.
  vicuna13b   Vicuna-13B v1.5 (Llama-2 13B shape) on TokenFlow-B features, `vicuna_v1` template (paper Table 3).
  qwen14b     Qwen2.5-14B-Instruct on TokenFlow-XL features (729 tokens), `qwen_2_5` template: the released
              ByteFlow-AI/Tokenflow-llava-qwen2.5-14B-finetuning.

Options: ``stage=1`` (alignment: projector only, lr 1e-3, global batch 256, `plain` template on captions),
``stage=2`` (instruction tuning: decoder + projector, lr 2e-5, batch 128), both cosine with 3% warmup and no
weight decay (ByteFlow-AI/TokenFlow ``i2t/scripts/v1_5/train.sh``); ``stage=0`` (tiny's default): everything
trains from scratch at lr 1e-3.
Which parameters train is chosen by the regexes ``train.trainable`` / ``train.frozen`` over parameter
paths (``projector/fc1/kernel``, ``llm/layers/...``); the tokenizer is always frozen (it is not part of
the trained state at all).

Initialisation: ``model.init`` = HF Llama / Qwen2 id or local directory for the decoder;
``model.init_checkpoint`` = a previous run's checkpoints directory (stage 2 from stage 1: every parameter
found there is taken, e.g. the aligned projector and the decoder).

  tokenflow-jax train --config configs/vlm.py:tiny --workdir /tmp/vlm
  tokenflow-jax train --config configs/vlm.py:qwen14b,stage=1 --workdir gs://b/s1 \\
      --config.tokenizer.checkpoint=gs://b/tokenflow_xl --config.data.path=alignment.jsonl --config.data.image_root=...
"""
from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import ConfigError


def llm(width, depth, heads, kv_heads, mlp, vocab, *, theta=1e4, eps=1e-5, qkv_bias=False, tie=False,
        max_positions=4096):
    return config_lib.ConfigDict(dict(
        vocab_size=vocab, width=width, depth=depth, num_heads=heads, num_kv_heads=kv_heads, mlp_dim=mlp,
        rope_theta=theta, norm_eps=eps, qk_norm=False, qk_norm_eps=1e-6, qkv_bias=qkv_bias,
        tie_embeddings=tie, max_positions=max_positions,
        dtype="float32", param_dtype="float32", remat="none",
    ))


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, variant="tiny", stage=-1)
    config = config_lib.ConfigDict()
    config.recipe = "vlm"
    config.seed = 0
    m = config.model = config_lib.ConfigDict()
    stage = int(arg.stage)
    if arg.variant == "tiny":
        stage = 0 if stage < 0 else stage
        tokenizer = "configs/tokenizer.py:tiny"
        # vocab_size 0: the text tokenizer's size.
        m.llm = llm(128, 4, 4, 2, 352, 0, max_positions=256)
        text = dict(tokenizer="builtin:shapes_chat", template="vicuna_v1")
        data = dict(source="shapes_vqa", num_examples=100_000, max_length=128, aspect="square",
                    kinds=("count", "colour", "shape", "position", "exists", "caption"))
        train = dict(global_batch_size=32, num_steps=1500, log_every=25, checkpoint_every=500,
                     length_buckets=(96, 128))
        init = ""
        mesh = (-1, 1, 1)
    elif arg.variant in ("vicuna13b", "qwen14b"):
        stage = 2 if stage < 0 else stage
        if arg.variant == "vicuna13b":
            tokenizer = "configs/tokenizer.py:b"
            m.llm = llm(5120, 40, 40, 40, 13824, 32000, theta=1e4, eps=1e-5, max_positions=4096)
            init = "lmsys/vicuna-13b-v1.5"
            text = dict(tokenizer=init, template="vicuna_v1")
        else:
            tokenizer = "configs/tokenizer.py:xl"
            m.llm = llm(5120, 48, 40, 8, 13824, 152064, theta=1e6, eps=1e-6, qkv_bias=True, max_positions=32768)
            init = "Qwen/Qwen2.5-14B-Instruct"
            text = dict(tokenizer=init, template="qwen_2_5")
        m.llm.dtype = "bfloat16"
        m.llm.remat = "full"
        data = dict(source="llava", num_examples=0, max_length=2048, aspect="pad" if stage == 2 else "square",
                    kinds=())
        train = dict(global_batch_size=128 if stage == 2 else 256, num_steps=10_000, log_every=10,
                     checkpoint_every=500, length_buckets=(512, 1024, 1536, 2048))
        mesh = (1, -1, 1)  # FSDP over every device; raise 'tensor' for tensor parallelism
    else:
        raise ConfigError(f"unknown vlm variant {arg.variant!r}; expected tiny, vicuna13b or qwen14b")
    if stage not in (0, 1, 2):
        raise ConfigError(f"configs/vlm.py: stage must be 0, 1 or 2, got {stage}")
    if stage == 1:
        text["template"] = "plain"
    m.features = "final"  # final | final_semantic | all_scales (models/vlm.py)
    m.init = init if stage in (1, 2) else ""
    m.init_checkpoint = ""  # a previous stage's checkpoints dir; every parameter found there is loaded
    config.stage = stage
    config.tokenizer = config_lib.ConfigDict(dict(config=tokenizer, overrides=[], checkpoint=""))
    config.text = config_lib.ConfigDict(text)

    # source: shapes_vqa (built in) | llava (JSONL / JSON list at data.path, images under data.image_root; paths
    # that leave image_root are refused). skip_budget: unusable records tolerated per batch element while looking
    # for a usable one (tokenflow_jax/data/replacement.py).
    config.data = config_lib.ConfigDict(dict(path="", image_root="", num_workers=0, skip_budget=4.0, **data))
    config.train = config_lib.ConfigDict(dict(
        trainable=("^projector/",) if stage == 1 else (),  # regexes; empty = everything
        frozen=(),
        keep_checkpoints=3, async_checkpoints=True, **train,
    ))
    lr = {0: 1e-3, 1: 1e-3, 2: 2e-5}[stage]
    # Adam, cosine to 0 after 3% linear warmup, no weight decay, clip 1.0 (`i2t/scripts/v1_5/train.sh`). The
    # schedule's length and warmup follow --config.train.num_steps: they are references to it, derived ones (the
    # `+ 0`), so overriding optim.decay_steps or optim.warmup_steps replaces that field alone.
    steps = config.train.get_ref("num_steps")
    config.optim = config_lib.ConfigDict(dict(lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                                          schedule="cosine", warmup_steps=(steps * 3 + 99) // 100,  # ceil(3%)
                                          decay_steps=steps + 0, min_lr_ratio=0.0))
    # chat / eval-vqa decoding
    config.generate = config_lib.ConfigDict(dict(max_new_tokens=16 if arg.variant == "tiny" else 512,
                                             temperature=0.0, top_k=0, top_p=0.0, batch_size=64))
    config.mesh = config_lib.ConfigDict(dict(shape=mesh, axes=("data", "fsdp", "tensor"), num_devices=0))
    return config
