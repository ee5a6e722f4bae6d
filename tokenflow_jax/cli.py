"""The ``tokenflow-jax`` command.

    tokenflow-jax train --config configs/tokenizer.py:tiny --workdir DIR
    tokenflow-jax eval --checkpoint DIR/checkpoints [--num-images N]
    tokenflow-jax reconstruct --config configs/tokenizer.py:tiny --images builtin --out DIR [--checkpoint CKPT]
    tokenflow-jax tokenize --config configs/tokenizer.py:tiny --data shapes --out DIR [--checkpoint CKPT]
    tokenflow-jax train --config configs/t2i.py:tiny --workdir DIR [--config.data.tokenized=TOKENS_DIR]
    tokenflow-jax generate --config configs/sample.py:tiny --checkpoint DIR --prompts FILE --out DIR
    tokenflow-jax eval-shapes --config configs/sample.py:tiny --checkpoint DIR [--loops 1,3]
    tokenflow-jax train --config configs/vlm.py:tiny --workdir DIR
    tokenflow-jax chat --checkpoint DIR/checkpoints --image X.png --prompt "How many circles are there?"
    tokenflow-jax eval-vqa --checkpoint DIR/checkpoints [--data builtin | questions.jsonl]
    tokenflow-jax train --config configs/unified.py:tiny --workdir DIR       (one model: generate and chat both
        take its checkpoint; generate --rerank N keeps the candidate the model itself judges best)
    tokenflow-jax convert --from official --checkpoint FILE.pt --config configs/tokenizer.py:xl --out DIR
    tokenflow-jax convert --from hf --model ID_OR_PATH --config configs/tokenizer.py:xl --out DIR
    tokenflow-jax convert --from official-t2i --model RELEASED_DIR --config configs/t2i.py:7b --out DIR
    tokenflow-jax convert --from official-vlm --model RELEASED_DIR --config configs/vlm.py:qwen14b --out DIR
    tokenflow-jax export --checkpoint DIR --out tokenflow.pt        (t2i / VLM checkpoints: --out FOLDER)
    tokenflow-jax compile --config configs/t2i.py:7b --topology v5p-256     (AOT for a TPU slice, on any CPU machine)
    tokenflow-jax demo --workdir DIR       (the whole system on built-in data, ~18 min on 2 CPU cores)
    tokenflow-jax sweep --config configs/ablations.py:w_dis --workdir DIR [--point I]   (a study: table and plots)

Multi-process launches (TPU pods, SLURM, launch/local_multiprocess.sh) are detected from the environment, or
given with --coordinator HOST:PORT --num-processes N --process-id I before the command (tokenflow_jax/distributed.py).

Every command takes ``--config FILE:ARG`` plus any number of ``--config.a.b=value`` overrides; the
config is loaded and validated (every field's range, tokenflow_jax/config_rules.py) before anything is created,
built or compiled.

Exit status: 0 done; 2 a user error (a bad config field, file, checkpoint or dataset; one line ``error: ...``);
143 a `train`, `demo` or `sweep` stopped before its last step by SIGTERM or a cluster preemption notice, after saving
its checkpoint (130 for Ctrl-C): run the same command again and it resumes. 1 with a traceback is a bug.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import CheckpointError, ConfigError, UserError

# Each command imports its recipe module (and jax, transformers, torch with it) when it runs, inside its
# cmd_* function: `tokenflow-jax --help` and a mistyped config stay instant. Everywhere else in the package,
# project imports sit at the top of the file (tests/test_layers.py).


def _enable_compilation_cache() -> None:
    """Persistent XLA cache: recompiles of unchanged programs become file reads."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tokenflow_jax", "jax")
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _load_config(spec: str | None, overrides: Sequence[str], checkpoint: str | None = None):
    if spec is None and checkpoint:
        from tokenflow_jax import checkpoint as ckpt

        meta = ckpt.read_meta(checkpoint)
        spec, overrides = meta.get("config_spec"), list(meta.get("config_overrides", [])) + list(overrides)
        if not spec:
            raise CheckpointError(f"checkpoint {checkpoint} records no config; pass --config FILE:ARG")
    if spec is None:
        raise ConfigError("--config FILE:ARG is required")
    return config_lib.build_config(spec, overrides)


def cmd_reconstruct(args, overrides) -> int:
    from tokenflow_jax.recipes.tokenizer import reconstruct

    config = _load_config(args.config, overrides, args.checkpoint)
    return reconstruct.run(config, args.images, args.out, args.checkpoint, batch_size=args.batch_size)


def cmd_train(args, overrides) -> int:
    from tokenflow_jax import recipes
    from tokenflow_jax.train import loop, preflight

    config = _load_config(args.config, overrides)
    preflight.check(config, args.workdir)  # before the trainer creates the workdir or a metrics file
    try:
        recipes.trainer(config).train(config, args.workdir)
    except loop.Stopped as stopped:  # SIGTERM / SIGINT / a preemption notice, checkpoint saved: not finished
        print(f"tokenflow-jax train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    return 0


def cmd_eval(args, overrides) -> int:
    from tokenflow_jax.recipes.tokenizer import evaluate as tokenizer_eval

    config = _load_config(args.config, overrides, args.checkpoint)
    return tokenizer_eval.run(config, args.checkpoint, args.out, args.num_images, args.batch_size,
                              with_fid=not args.no_fid, with_semantic=args.semantic)


def cmd_tokenize(args, overrides) -> int:
    from tokenflow_jax.recipes.tokenizer import tokenize

    config = _load_config(args.config, overrides, args.checkpoint)
    return tokenize.run(config, args.checkpoint, args.data, args.out, num_images=args.num_images,
                        batch_size=args.batch_size, chunk_size=args.chunk_size)


def _unified_server(checkpoint: str):
    """The loaded model when ``checkpoint`` holds a unified run (it serves every inference command), else None."""
    from tokenflow_jax.recipes.unified import serve

    config = serve.recorded_config(checkpoint)
    return None if config is None else serve.UnifiedServer(config, checkpoint)


def cmd_generate(args, overrides) -> int:
    from tokenflow_jax.recipes.t2i import sample as generate

    config = _load_config(args.config, overrides)
    server = _unified_server(args.checkpoint)
    generator = server and server.image_generator(config)
    judge = server.caption_judge() if server and args.rerank > 1 else None
    return generate.run(config, args.checkpoint, args.prompts, args.out, per_prompt=args.per_prompt, seed=args.seed,
                        generator=generator, judge=judge, rerank=args.rerank)


def cmd_eval_shapes(args, overrides) -> int:
    from tokenflow_jax.recipes.t2i import evaluate as generation_eval

    config = _load_config(args.config, overrides)
    try:
        loops = [int(x) for x in args.loops.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--loops must be a comma-separated list of 1, 2, 3, got {args.loops!r}") from None
    server = _unified_server(args.checkpoint)
    judge = server.caption_judge() if server and args.rerank > 1 else None
    return generation_eval.run(config, args.checkpoint, args.num_per_category, loops, args.out,
                               generator=server and server.image_generator(config), judge=judge, rerank=args.rerank)


def _vqa_config_and_model(args, overrides):
    """(VLM config, None) for a VLM run; (the unified run's VLM view, its answerer) for a unified run."""
    config = _load_config(args.config, overrides, args.checkpoint)
    if config.get("recipe") != "unified":
        return config, None
    from tokenflow_jax.recipes.unified import serve

    server = serve.UnifiedServer(config, args.checkpoint)
    return server.vlm_config, server.vqa_model()


def cmd_chat(args, overrides) -> int:
    from tokenflow_jax.recipes.vlm import answer as vlm_infer

    config, vqa = _vqa_config_and_model(args, overrides)
    return vlm_infer.chat(config, args.checkpoint, args.image, args.prompt, vqa=vqa)


def cmd_eval_vqa(args, overrides) -> int:
    from tokenflow_jax.recipes.vlm import evaluate as vqa_eval

    config, vqa = _vqa_config_and_model(args, overrides)
    return vqa_eval.run(config, args.checkpoint, args.data, args.out, args.num_per_category, vqa=vqa)


def cmd_convert(args, overrides) -> int:
    from tokenflow_jax.apps import convert as convert_run

    config = _load_config(args.config, overrides)
    if args.source == "official":
        if not args.checkpoint:
            raise ConfigError("--from official needs --checkpoint FILE.pt")
        return convert_run.from_official(config, args.checkpoint, args.out)
    if not args.model:
        raise ConfigError(f"--from {args.source} needs --model "
                         + ("HUB_ID_OR_PATH" if args.source == "hf" else "RELEASED_MODEL_DIR"))
    convert = {"hf": convert_run.from_hf, "official-t2i": convert_run.from_official_t2i,
               "official-vlm": convert_run.from_official_vlm}[args.source]
    return convert(config, args.model, args.out)


def cmd_export(args, overrides) -> int:
    from tokenflow_jax.apps import convert as convert_run

    config = _load_config(args.config, overrides, args.checkpoint)
    recipe = config.get("recipe", "tokenizer")
    if recipe not in ("tokenizer", "t2i", "vlm"):
        raise ConfigError(f"export writes the official layouts of tokenizer, t2i and VLM runs; {args.checkpoint!r} "
                          f"holds a {recipe!r} run, which has no official counterpart")
    if recipe in ("t2i", "vlm"):
        export = convert_run.to_official_t2i if recipe == "t2i" else convert_run.to_official_vlm
        return export(config, args.checkpoint, args.out, args.dtype)
    if args.dtype:
        raise ConfigError("--dtype applies to t2i and VLM exports; the tokenizer keeps its float32 weights")
    return convert_run.to_official(config, args.checkpoint, args.out)


def cmd_demo(args, overrides) -> int:
    from tokenflow_jax.apps import demo

    return demo.run(_load_config(args.config, overrides), args.workdir)


def cmd_sweep(args, overrides) -> int:
    from tokenflow_jax.apps import sweep

    config = _load_config(args.config, overrides)
    if config.get("recipe") != "sweep":
        raise ConfigError(f"--config {args.config!r} is a {config.get('recipe')!r} config; sweep takes a study, e.g. "
                          "configs/ablations.py:w_dis")
    return sweep.run(config, args.workdir, args.point)


def cmd_compile(args, overrides) -> int:
    from tokenflow_jax.apps import compile as aot

    return aot.main(args, overrides)


def build_parser() -> argparse.ArgumentParser:
    from tokenflow_jax import distributed
    from tokenflow_jax.apps import compile as aot

    parser = argparse.ArgumentParser(prog="tokenflow-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="python logging level (default INFO)")
    distributed.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reconstruct", help="encode + decode images with a tokenizer, write PNGs, print PSNR")
    p.add_argument("--config", help="config FILE:ARG, e.g. configs/tokenizer.py:tiny (default: the checkpoint's)")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders, or 'builtin' (sample photos)")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--checkpoint", help="orbax checkpoint directory (default: random weights, with a warning)")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(fn=cmd_reconstruct)

    p = sub.add_parser("train", help="train the recipe named by the config; resumes from DIR's checkpoints")
    p.add_argument("--config", required=True, help="config FILE:ARG, e.g. configs/tokenizer.py:tiny")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/ and images/ go here")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="PSNR, SSIM, LPIPS, rFID and codebook usage of a tokenizer checkpoint")
    p.add_argument("--config", help="config FILE:ARG (default: the checkpoint's)")
    p.add_argument("--checkpoint", help="orbax checkpoint directory (e.g. WORKDIR/checkpoints)")
    p.add_argument("--num-images", type=int, help="default config.eval.num_images")
    p.add_argument("--batch-size", type=int, help="global batch, default config.eval.batch_size")
    p.add_argument("--no-fid", action="store_true", help="skip rFID (InceptionV3 is ~6 GFLOP per image)")
    p.add_argument("--semantic", action="store_true", help="also the semantic features' cosine to the config's "
                                                           "teacher (loads config.teacher)")
    p.add_argument("--out", help="JSON output (default CHECKPOINT/eval.json)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("tokenize", help="encode a dataset once into ArrayRecord shards of (token indices, caption)")
    p.add_argument("--config", help="tokenizer config FILE:ARG (default: the checkpoint's)")
    p.add_argument("--checkpoint", help="orbax checkpoint directory (default: random weights, with a warning)")
    p.add_argument("--data", help="'shapes', an image folder (+ .txt captions), an ArrayRecord path/glob, or "
                                  "tfds:NAME[:SPLIT] (default: config.data)")
    p.add_argument("--out", required=True, help="output folder: manifest.json + tokens-P*-C*.arrayrecord; a "
                                                "re-run resumes")
    p.add_argument("--num-images", type=int, help="the first N records of the source (default: all)")
    p.add_argument("--batch-size", type=int, help="global batch, default config.eval.batch_size")
    p.add_argument("--chunk-size", type=int, default=4096, help="records per shard file and process")
    p.set_defaults(fn=cmd_tokenize)

    p = sub.add_parser("generate", help="sample images for a file of prompts with a t2i checkpoint (resumable)")
    p.add_argument("--config", required=True, help="sampling config FILE:ARG, e.g. configs/sample.py:tiny")
    p.add_argument("--checkpoint", required=True, help="t2i (or unified) training run's checkpoints directory")
    p.add_argument("--prompts", required=True, help="prompt file: one per line (.txt) or JSON lines with 'prompt'")
    p.add_argument("--out", required=True, help="output folder: images/, grids/, manifest.jsonl")
    p.add_argument("--per-prompt", type=int, help="images per prompt (default config.per_prompt)")
    p.add_argument("--seed", type=int, help="default config.seed")
    p.add_argument("--rerank", type=int, default=1, metavar="N",
                   help="unified checkpoints: draw N candidates per image and keep the one the model itself scores "
                        "best (log-likelihood of the prompt as the candidate's caption); default 1")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("eval-shapes", help="ShapesEval (GenEval in the shapes world) of a t2i checkpoint per "
                                           "sampling strategy")
    p.add_argument("--config", required=True, help="sampling config FILE:ARG, e.g. configs/sample.py:tiny")
    p.add_argument("--checkpoint", required=True, help="t2i (or unified) training run's checkpoints directory")
    p.add_argument("--num-per-category", type=int, default=20, help="prompts per GenEval category (6 categories)")
    p.add_argument("--loops", default="1,3", help="sampling strategies to compare: passes per scale (1, 2, 3)")
    p.add_argument("--out", help="JSON output (default CHECKPOINT/shapes_eval.json)")
    p.add_argument("--rerank", type=int, default=1, metavar="N",
                   help="unified checkpoints: also score N candidates per prompt: their mean, the one the model "
                        "judges best, and the best by the detector")
    p.set_defaults(fn=cmd_eval_shapes)

    p = sub.add_parser("chat", help="answer a question about an image with a VLM checkpoint, streaming the reply")
    p.add_argument("--config", help="vlm config FILE:ARG (default: the checkpoint's)")
    p.add_argument("--checkpoint", required=True, help="VLM (or unified) training run's checkpoints directory")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the question")
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("eval-vqa", help="exact-match accuracy of a VLM checkpoint (Shapes-VQA or a question file)")
    p.add_argument("--config", help="vlm config FILE:ARG (default: the checkpoint's)")
    p.add_argument("--checkpoint", required=True, help="VLM (or unified) training run's checkpoints directory")
    p.add_argument("--data", default="builtin", help="'builtin' (held-out Shapes-VQA) or a questions .jsonl file")
    p.add_argument("--num-per-category", type=int, default=50, help="builtin questions per category")
    p.add_argument("--out", help="JSON output (default CHECKPOINT/vqa_eval.json)")
    p.set_defaults(fn=cmd_eval_vqa)

    p = sub.add_parser("convert", help="import released TokenFlow models (tokenizer .pt, t2i, VLM) or HF "
                                       "CLIP/SigLIP weights into a checkpoint")
    p.add_argument("--from", dest="source", choices=("official", "official-t2i", "official-vlm", "hf"),
                   required=True, help="official: a tokenizer .pt; official-t2i / official-vlm: a released "
                                       "text-to-image / understanding folder; hf: a CLIP/SigLIP vision tower")
    p.add_argument("--config", required=True, help="config FILE:ARG the weights belong to (configs/tokenizer.py:xl, "
                                                   "configs/t2i.py:7b, configs/vlm.py:qwen14b)")
    p.add_argument("--checkpoint", help="official .pt / .safetensors file (--from official)")
    p.add_argument("--model", help="local directory (or hub id) of the released folder (--from official-t2i / "
                                   "official-vlm) or of a CLIP/SigLIP vision model (--from hf)")
    p.add_argument("--out", required=True, help="output orbax checkpoint directory")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("export", help="write a checkpoint in its official layout: a tokenizer .pt, or a t2i / VLM "
                                      "folder (config.json, safetensors, tokenizer files)")
    p.add_argument("--checkpoint", required=True, help="orbax checkpoint directory")
    p.add_argument("--config", help="config FILE:ARG (default: the checkpoint's)")
    p.add_argument("--out", required=True, help="output .pt or .safetensors file (tokenizer) or folder (t2i, VLM)")
    p.add_argument("--dtype", default="", choices=("", "float32", "bfloat16", "float16"),
                   help="t2i / VLM weights' dtype (default: the parameters' own)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("demo", help="the whole system on built-in data (~18 min on 2 CPU cores): tokenizer, t2i and "
                                    "VLM trained and evaluated, DIR/report.md; re-running continues")
    p.add_argument("--workdir", required=True, help="every stage's run, the images and report.md go here")
    p.add_argument("--config", default="configs/demo.py", help="demo config FILE (default configs/demo.py)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("sweep", help="run a study's points (configs/ablations.py:NAME), each a resumable demo-style "
                                     "run, then DIR/results.json, results.md and plots; re-running continues")
    p.add_argument("--config", required=True, help="study FILE:NAME, e.g. configs/ablations.py:w_dis")
    p.add_argument("--workdir", required=True, help="DIR/points/<name> per point, the table and plots in DIR")
    p.add_argument("--point", type=int, help="run point I alone (0-based), e.g. one per cluster job")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("compile", help="compile a config's train step (or sampler) for a TPU slice on this machine: "
                                       "mesh, per-device HBM, FLOPs; exit 1 when it does not fit")
    aot.add_arguments(p)
    p.set_defaults(fn=cmd_compile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = config_lib.split_config_args(argv)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _enable_compilation_cache()
    try:
        if args.command != "compile":  # an AOT compile is one process on a CPU machine
            from tokenflow_jax import distributed

            distributed.initialize(args)
        return int(args.fn(args, overrides) or 0)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading, compiling, evaluating)
        if os.environ.get("TOKENFLOW_DEBUG"):
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        # Bad input (a config field, a checkpoint, a weights file, the data): one line naming it, exit 2. Any other
        # exception is a bug and keeps its traceback. TOKENFLOW_DEBUG=1 shows the traceback of this one too.
        if os.environ.get("TOKENFLOW_DEBUG"):
            raise
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2


def user_message(error: UserError) -> str:
    """The error's message (a KeyError's str() would wrap it in quotes)."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


if __name__ == "__main__":
    sys.exit(main())
