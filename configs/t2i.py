"""Next-scale text-to-image configs (ByteFlow-AI/TokenFlow ``t2i/llava_t2i``, ``t2i/scripts/train_t2i.sh``).

Variants (``configs/t2i.py:ARG``):
  tiny    CPU-sized decoder on the `tiny` tokenizer's 5 scales (1, 2, 4, 6, 8; 121 tokens) and the built-in
          shapes captions; a small word-level text tokenizer is built from the captions offline.
  1b      TinyLlama-1.1B shape (the paper's 1B row, Table 7): 22 layers, width 2048, GQA 32/4 heads.
  7b      Llama-2-7B shape with QK-norm, as the released ByteFlow-AI/TokenFlow-t2i: 32 layers, width 4096,
          MHA 32 heads, the vocabulary extended by [PAD] (id 32000) then 32,768 <vq_token_i> (ids 32001..64768).
The 1b and 7b variants use TokenFlow-B at 256 px (9 scales, 817 tokens) and Llama text tokens.

Block order (``model.llm.block_order``, models/transformer.py): 1b and 7b use the released t2i decoder's
``post_sublayer_norm`` (``h = x + norm(attn(x))``, ``out = h + norm(mlp(h))``), so the released weights load and
reproduce, and a run initialised from Llama-2 trains the block the official recipe trains. ``tiny`` keeps the
standard ``pre_norm``: it is trained from scratch (no released weights to match), and the demo's figures and
its sizing were measured with it; ``--config.model.llm.block_order=post_sublayer_norm`` switches it.

Options: ``head=separate|extended`` (default: extended for 7b as the reference, separate otherwise).

The frozen image tokenizer: ``tokenizer.config`` (FILE:ARG) + ``tokenizer.overrides`` (list of 'a.b=v'),
or, when ``tokenizer.config`` is empty, the config recorded in ``tokenizer.checkpoint``. Image tokens come
from ``data.tokenized`` (shards written by ``tokenflow-jax tokenize`` with that tokenizer) or, when it is
empty, from encoding ``data``'s images online each step. Captions are dropped to the empty caption with
probability ``train.cond_drop_rate`` (the unconditional branch of classifier-free guidance).

  tokenflow-jax train --config configs/t2i.py:tiny --workdir /tmp/t2i
  ... --config configs/t2i.py:7b --config.model.init=meta-llama/Llama-2-7b-hf
"""
from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import ConfigError

NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst "
    "quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
LLAMA_VOCAB = 32000


def llm(width, depth, heads, kv_heads, mlp, vocab, *, qk_norm, block_order, theta=1e4, eps=1e-5,
        max_positions=2048):
    return config_lib.ConfigDict(dict(
        vocab_size=vocab, width=width, depth=depth, num_heads=heads, num_kv_heads=kv_heads, mlp_dim=mlp,
        rope_theta=theta, norm_eps=eps, qk_norm=qk_norm, qk_norm_eps=1e-6, qkv_bias=False,
        tie_embeddings=False, max_positions=max_positions, block_order=block_order,
        dtype="float32", param_dtype="float32", remat="none",
    ))


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, variant="tiny", head="")
    config = config_lib.ConfigDict()
    config.recipe = "t2i"
    config.seed = 0
    m = config.model = config_lib.ConfigDict()
    if arg.variant == "tiny":
        config.tokenizer = config_lib.ConfigDict(dict(config="configs/tokenizer.py:tiny", overrides=[], checkpoint=""))
        # vocab_size 0: taken from the text tokenizer built from the shapes captions.
        m.llm = llm(128, 4, 4, 2, 352, 0, qk_norm=True, block_order="pre_norm", max_positions=256)
        m.text_length = 24
        head = arg.head or "separate"
        text = dict(tokenizer="builtin:shapes", uncond_prompt="")
        train = dict(global_batch_size=16, num_steps=2000, warmup_steps=100, log_every=20, checkpoint_every=500)
        # CFG 30 (the weight of the last scale; the ramp starts at 0 on the 1x1 scale): chosen on held-out prompts
        # (ShapesEval's prompt seed 1, 360 prompts, 1-step / 3-step) with the previous demo's checkpoint: CFG 3
        # 16.7% (3-step, seed 0), 10: 28.6% / 24.7%, 20: 34.4% / 31.9%, 30: 35.3% / 32.8%, 45: 36.9% / 31.1%,
        # 70: 35.6% / 37.5% (a plateau from ~20 within the ~2.5-point standard error); on the evaluation
        # prompts (seed 0) CFG 3 -> 30 took the same checkpoint from 17.5% / 16.7% to 35.6% / 31.7%.
        sample = dict(cfg_scale=30.0, top_k=(64, 16, 1), top_p=(0.8, 0.8, 0.0))
    elif arg.variant in ("1b", "7b"):
        config.tokenizer = config_lib.ConfigDict(dict(config="configs/tokenizer.py:b,res=256,enhanced", overrides=[],
                                                   checkpoint=""))
        head = arg.head or ("extended" if arg.variant == "7b" else "separate")
        vocab = LLAMA_VOCAB + (1 + 32768 if head == "extended" else 0)  # + [PAD] and <vq_token_i>
        official = dict(qk_norm=True, block_order="post_sublayer_norm")  # the released t2i decoder
        if arg.variant == "1b":
            m.llm = llm(2048, 22, 32, 4, 5632, vocab, **official)  # TinyLlama-1.1B
            text_model = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
        else:
            m.llm = llm(4096, 32, 32, 32, 11008, vocab, **official)  # Llama-2-7B
            text_model = "meta-llama/Llama-2-7b-hf"
        m.llm.remat = "full"
        m.llm.dtype = "bfloat16"
        # The reference's max_text_token_num (128, BOS included) + tokens("<img>") (3 with the Llama tokenizer).
        m.text_length = 131
        text = dict(tokenizer=text_model, uncond_prompt=NEGATIVE_PROMPT)
        train = dict(global_batch_size=256, num_steps=200_000, warmup_steps=5000, log_every=50,
                     checkpoint_every=2000)
        sample = dict(cfg_scale=7.5, top_k=(1200, 100, 1), top_p=(0.8, 0.8, 0.0))
    else:
        raise ConfigError(f"unknown t2i variant {arg.variant!r}; expected tiny, 1b or 7b")
    m.head = head
    m.init = ""  # HF Llama id or path: initialise the decoder from it (vocabulary extended)
    config.text = config_lib.ConfigDict(dict(image_marker="<img>", **text))

    config.data = config_lib.ConfigDict(dict(
        source="shapes", num_examples=100_000, path="", split="train", num_workers=0,
        tokenized="",  # ArrayRecord shards from `tokenflow-jax tokenize`; empty = tokenise online
        # Online only: crop 'adm' | 'center' ('' = center for shapes, adm otherwise); skip_budget = unusable
        # images tolerated per batch element while looking for a usable one (tokenflow_jax/data/replacement.py).
        crop="", skip_budget=4.0,
    ))
    # AdamW lr 5e-4, wd 0.1, constant after warmup, clip 0.5 (ByteFlow-AI/TokenFlow `t2i/scripts/train_t2i.sh`);
    # captions dropped at 10% for CFG (`cond_drop_rate` in the ByteFlow-AI/TokenFlow-t2i hub config).
    config.optim = config_lib.ConfigDict(dict(lr=5e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=0.5,
                                          schedule="constant", warmup_steps=train.pop("warmup_steps")))
    config.train = config_lib.ConfigDict(dict(cond_drop_rate=0.1, keep_checkpoints=3, async_checkpoints=True,
                                          **train))
    # Used when optim.schedule='cosine' (constant ignores them): the decay follows train.num_steps (a derived
    # reference, so overriding optim.decay_steps replaces that field alone) down to min_lr_ratio * lr.
    config.optim.decay_steps = config.train.get_ref("num_steps") + 0
    config.optim.min_lr_ratio = 0.0
    config.sample = config_lib.ConfigDict(sample)
    # tiny: data parallel; 1b / 7b: parameters and optimizer state sharded over all devices (FSDP).
    shape = (-1, 1, 1) if arg.variant == "tiny" else (1, -1, 1)
    config.mesh = config_lib.ConfigDict(dict(shape=shape, axes=("data", "fsdp", "tensor"), num_devices=0))
    return config
