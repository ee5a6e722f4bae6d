"""Text-to-image sampling against the OFFICIAL sampler, side by side in one run (both on the CPU, float32).

Two timing workers run at once and get their requests alternately, so both see the same machine load:
``bench/sample_serve.py`` (this project: ``generate``'s KV-cached sampler, one key per image) and
``bench/official_t2i_serve.py`` (ByteFlow-AI/TokenFlow's ``autoregressive_infer_cfg``, fetched and run outside
this repository: see that file for where to get it and what its adapter does). Both read the same weights:
random ones are initialised here, written in the official layout by the project's exporter
(``convert/official_t2i.to_state_dict`` + ``convert/llava.write_folder``, what ``tokenflow-jax export`` runs),
loaded by the official ``from_pretrained`` on one side and by the project's importer
(``convert/official_t2i.to_params``) on the other. The image tokenizer's decode is not timed on either side.

Per config, at the 9-scale 256 px schedule (1, 2, ..., 16: 817 tokens) with CFG 7.5:

* timing: ``--pairs`` paired calls of the paper's 3-pass strategy (top-k [1200, 100, 1] clipped to K, top-p
  [0.8, 0.8, 0], 25 forward passes), B prompts per call, alternating which worker goes first: s/image of each,
  the median of the per-pair ratios (the speed-up) and its range;
* parity: one greedy call each (top-k 1 in all 3 passes, top-p 0): whether the codes are identical at every
  scale, and per (scale, pass) the largest |ours - official| of the guided image-code logits over the largest
  |official| (``max_rel_err``; the official's logits over the whole vocabulary are cut to the K code ids, the
  only ones it can sample).

``--throughput``: this project's ``generate`` sampler alone on the reduced 1b, images/s at batches
``--throughput-batches``: one timed call after the compile (and an untimed warm-up call below
``--no-warmup-from``), with XLA's temporary and peak memory estimate; a batch whose peak exceeds the
memory available now is compiled but not run. ``--configs ''`` runs only this.

Configs (the released t2i layout: ``post_sublayer_norm`` blocks, QK-norm, the extended vocabulary head):
  tiny        configs/t2i.py:tiny's decoder (width 128, 4 layers, 4/2 heads) on a 300-id text vocabulary,
              K = 1024 (V = 1325), text length 24.
  1b-reduced  configs/t2i.py:1b (TinyLlama shape: width 2048, 32/4 GQA heads, MLP 5632) cut to 2 of its 22
              layers, K = 32768 (V = 32000 + [PAD] + 32768 = 64769), text length 131.
Prompts are random ids: B conditional prompts of different lengths and one shorter unconditional prompt.
The official puts each row's image right after that row's text; ours left-pads the text to the text length
with the padding masked, which RoPE (relative positions) makes the same computation.

    python bench/sample_official.py --official /path/to/TokenFlow --site /path/to/transformers-4.43.4 \\
        [--configs tiny,1b-reduced] [--batch 1] [--pairs 3] [--throughput] [--quick] [--out FILE]
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from tokenflow_jax.convert import llava, official_t2i  # noqa: E402
from tokenflow_jax.models import t2i, transformer  # noqa: E402
from tokenflow_jax.ops import sampling  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
SCALES_256 = (1, 2, 4, 6, 8, 10, 12, 14, 16)
CFG = 7.5
PAPER = (sampling.DEFAULT_TOP_K, sampling.DEFAULT_TOP_P)  # [1200, 100, 1], [0.8, 0.8, 0]
GREEDY = ((1, 1, 1), (0.0, 0.0, 0.0))
HEAD_SHARPEN = 20.0  # as bench/sample.py: peaked logits like a trained model's, so greedy near-ties are rare
TARGET_SPEEDUP = 5.0  # issue 20
PARITY_TOLERANCE = 1e-4
PAIRS = {"tiny": 3, "1b-reduced": 3}  # an official 1b call takes minutes here
LLM = dict(qk_norm=True, block_order="post_sublayer_norm", norm_eps=1e-5, qk_norm_eps=1e-6, rope_theta=1e4)
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(llm=dict(width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=352, max_positions=1024),
                 text_vocab=300, codebook_size=1024, text_length=24),
    "1b-reduced": dict(llm=dict(width=2048, depth=2, num_heads=32, num_kv_heads=4, mlp_dim=5632, max_positions=2048),
                       text_vocab=32000, codebook_size=32768, text_length=131),
}


# --------------------------------------------------------------------------------------- model and data
def build(name: str) -> t2i.T2IConfig:
    spec = CONFIGS[name]
    k, vocab = spec["codebook_size"], spec["text_vocab"] + 1 + spec["codebook_size"]  # text, [PAD], codes
    llm = transformer.TransformerConfig(vocab_size=vocab, **LLM, **spec["llm"])
    return t2i.T2IConfig(llm=llm, scales=SCALES_256, codebook_size=k, text_length=spec["text_length"],
                         head="extended", image_token_start=vocab - k)


def export(name: str, folder: str) -> t2i.T2IConfig:
    """Random weights -> ``folder`` in the official layout, plus ``codebook.npz`` (random raw codebooks)."""
    cfg = build(name)
    model = t2i.NextScaleT2I(cfg)
    params = jax.jit(model.init)(jax.random.key(0), *[np.zeros(a.shape, a.dtype) for a in t2i.init_args(cfg)])
    params = nn.unbox(params)["params"]
    llm = dict(params["llm"])
    llm["lm_head"] = jax.tree.map(lambda x: x * HEAD_SHARPEN, llm["lm_head"])
    params = {**params, "llm": llm}
    llava.write_folder(folder, official_t2i.to_state_dict(params, cfg), official_t2i.hf_config(cfg))
    rng = np.random.default_rng(0)
    np.savez(os.path.join(folder, "codebook.npz"), semantic=rng.normal(size=(cfg.codebook_size, 32)).astype(np.float32),
             pixel=rng.normal(size=(cfg.codebook_size, cfg.code_dim - 32)).astype(np.float32),
             scales=np.asarray(cfg.scales, np.int64))
    return cfg


def prompts(cfg: t2i.T2IConfig, batch: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """B conditional prompts of lengths in [P/2, P] and one unconditional prompt of ~0.45 P ids (BOS = 1 first;
    ids from 3 up to the text vocabulary, so never [PAD] or a code)."""
    rng = np.random.default_rng(seed)
    p, text_vocab = cfg.text_length, cfg.image_token_start - 1

    def prompt(length: int) -> list[int]:
        return [1] + rng.integers(3, text_vocab, size=length - 1).tolist()

    cond = [prompt(int(n)) for n in rng.integers(p // 2, p + 1, size=batch)]
    return cond, prompt(max(2, int(0.45 * p)))


# -------------------------------------------------------------------------------------------- workers
class Client:
    """One worker process speaking JSON lines."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str] | None = None):
        self.label = label
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} worker exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def start_official(args) -> Client:
    argv = [args.official_python or sys.executable, os.path.join(BENCH, "official_t2i_serve.py"),
            "--official", args.official]
    if args.site:
        argv += ["--site", args.site]
    return Client("official", argv)


def request(folder: str, cfg: t2i.T2IConfig, cond, uncond, strategy, **extra) -> dict[str, Any]:
    top_k, top_p = strategy
    return {"folder": folder, "model": dataclasses.asdict(cfg), "cond": cond, "uncond": uncond, "cfg": CFG,
            "top_k": [min(k, cfg.codebook_size) for k in top_k], "top_p": list(top_p), "seed": 0, **extra}


# ------------------------------------------------------------------------------------------- parity
def parity(cfg: t2i.T2IConfig, ours_file: str, official_file: str, ours_codes, official_codes) -> dict[str, Any]:
    """Codes per scale and guided-logit errors per (scale, pass) from the two recordings."""
    ours_codes, official_codes = np.asarray(ours_codes), np.asarray(official_codes)
    offsets = cfg.token_offsets
    same_scale = [bool(np.array_equal(ours_codes[:, a:b], official_codes[:, a:b]))
                  for a, b in zip(offsets, offsets[1:])]
    with np.load(ours_file) as a, np.load(official_file) as b:
        mine = [a[f"arr_{i}"] for i in range(len(a.files))]
        theirs = [b[f"arr_{i}"] for i in range(len(b.files))]
    if len(mine) != len(theirs):
        raise RuntimeError(f"recorded {len(mine)} (ours) vs {len(theirs)} (official) sampling steps")
    errors = []
    for x, y in zip(mine, theirs):
        if x.shape != y.shape:
            raise RuntimeError(f"guided logits of shape {x.shape} (ours) vs {y.shape} (official)")
        errors.append(float(np.max(np.abs(x - y)) / np.max(np.abs(y))))
    # Steps in call order: scale 0 once, then every later scale once per pass.
    passes = (len(mine) - 1) // (len(cfg.scales) - 1)
    labels = ["0.0"] + [f"{si}.{pi}" for si in range(1, len(cfg.scales)) for pi in range(passes)]
    worst = int(np.argmax(errors))
    return {"identical_codes": all(same_scale), "identical_per_scale": same_scale,
            "code_agreement": float(np.mean(ours_codes == official_codes)), "max_rel_err": max(errors),
            "worst_step": labels[worst], "rel_err_per_step": dict(zip(labels, errors)),
            "logits_equal": max(errors) <= PARITY_TOLERANCE}


# -------------------------------------------------------------------------------------------- runs
def compare(name: str, args, ours: Client, official: Client, scratch: str) -> dict[str, Any]:
    folder = os.path.join(scratch, name)
    t0 = time.perf_counter()
    cfg = export(name, folder)
    print(f"[{name}] exported to {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    row: dict[str, Any] = {"config": name, "batch": args.batch, "params_M": cfg.llm.num_params() / 1e6,
                           "vocab": cfg.llm.vocab_size, "K": cfg.codebook_size, "tokens": cfg.num_tokens}

    # Parity first (greedy), which also loads the model in both workers and is the official's warm-up call.
    cond, uncond = prompts(cfg, args.batch, seed=1)
    files = {w.label: os.path.join(folder, f"{w.label}_guided_logits.npz") for w in (ours, official)}
    answers = {w.label: w.ask(request(folder, cfg, cond, uncond, GREEDY, record=files[w.label], warmup=False))
               for w in (ours, official)}
    row.update(parity(cfg, files["ours"], files["official"], answers["ours"]["codes"], answers["official"]["codes"]))
    print(f"[{name}] greedy parity: identical codes {row['identical_codes']}, max rel err {row['max_rel_err']:.2e}",
          flush=True)

    # Timing: the paper's 3-pass strategy, paired calls, alternating order.
    cond, uncond = prompts(cfg, args.batch, seed=0)
    req = request(folder, cfg, cond, uncond, PAPER, repeats=1)
    row["ours_compile_s"] = ours.ask({**req, "repeats": 0})["compile_s"]  # compile + warm-up call
    times: dict[str, list[float]] = {"ours": [], "official": []}
    pairs = args.pairs or PAIRS[name]
    for pair in range(pairs):
        order = (ours, official) if pair % 2 == 0 else (official, ours)
        for w in order:
            times[w.label] += w.ask(req)["runs"]
        print(f"[{name}] pair {pair + 1}/{pairs}: ours {times['ours'][-1]:.2f} s, official "
              f"{times['official'][-1]:.2f} s", flush=True)
    ratios = [o / m for o, m in zip(times["official"], times["ours"])]
    for label in ("ours", "official"):
        row[f"{label}_s_per_img"] = statistics.median(times[label]) / args.batch
        row[f"{label}_s_per_img_min"] = min(times[label]) / args.batch
        row[f"{label}_runs"] = times[label]
    row.update(speedup=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios),
               target_speedup=TARGET_SPEEDUP, pairs=pairs)
    return row


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (what a new allocation can get without swapping), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return common.physical_memory_bytes()


def throughput(args, ours: Client, scratch: str) -> list[dict[str, Any]]:
    """generate's sampler alone: compile first, and time a batch only when its XLA peak fits in memory."""
    name = "1b-reduced"
    folder = os.path.join(scratch, name)
    if not os.path.isdir(folder):
        export(name, folder)
    cfg = build(name)
    rows = []
    columns = ["config", "batch", "s_per_call", "img_per_s", "s_per_img", "xla_temp_gib", "peak_gib", "compile_s"]
    for b in args.throughput_batches:
        cond, uncond = prompts(cfg, b, seed=2)
        warmup = b < args.no_warmup_from
        req = request(folder, cfg, cond, uncond, PAPER, repeats=1, warmup=warmup)
        compiled = ours.ask({**req, "repeats": 0, "warmup": False})  # compile only
        memory = compiled["memory"] or {}
        row = {"config": name, "batch": b, "compile_s": compiled["compile_s"], "warmup": warmup,
               "xla_temp_gib": memory.get("temp_bytes", 0) / common.GiB,
               "peak_gib": memory.get("peak_estimate_bytes", 0) / common.GiB,
               "available_gib": available_memory_bytes() / common.GiB}
        if row["peak_gib"] > row["available_gib"]:
            row["skipped"] = f"needs {row['peak_gib']:.1f} GiB, {row['available_gib']:.1f} GiB available"
            print(f"[{name}] batch {b}: not run, {row['skipped']}", flush=True)
        else:
            seconds = ours.ask(req)["runs"][0]
            row.update(s_per_call=seconds, img_per_s=b / seconds, s_per_img=seconds / b)
        rows.append(row)
        common.print_table(rows[-1:], columns)
    return rows


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--official", default=os.environ.get("TOKENFLOW_OFFICIAL", ""),
                        help="ByteFlow-AI/TokenFlow checkout (default: $TOKENFLOW_OFFICIAL)")
    parser.add_argument("--site", default=os.environ.get("TOKENFLOW_OFFICIAL_SITE", ""),
                        help="folder holding transformers==4.43.4 for the official worker (see official_t2i_serve.py)")
    parser.add_argument("--official-python", default="", help="python for the official worker (default: this one)")
    parser.add_argument("--configs", default="tiny,1b-reduced", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--batch", type=int, default=1, help="prompts per call (2x rows with the uncond branch)")
    parser.add_argument("--pairs", type=int, default=0, help=f"paired timed calls per config (default {PAIRS})")
    parser.add_argument("--throughput", action="store_true", help="also time generate's sampler on 1b-reduced alone")
    parser.add_argument("--throughput-batches", default="1,16,64")
    parser.add_argument("--no-warmup-from", type=int, default=16,
                        help="batches this large get no untimed warm-up call (1b at 64: ~40 min a call here)")
    parser.add_argument("--scratch", default="", help="folder for the exported models (default: a temporary one)")
    args = parser.parse_args()
    names = common.config_names(parser, args.configs, CONFIGS)  # none: --throughput alone
    if names and not args.official:
        parser.error("--official (or TOKENFLOW_OFFICIAL) is required: a ByteFlow-AI/TokenFlow checkout")
    args.throughput_batches = [int(b) for b in args.throughput_batches.split(",") if b.strip()]
    if args.quick:
        args.pairs = 1
    scratch = args.scratch or tempfile.mkdtemp(prefix="sample_official_")

    matmul_start = common.matmul_gflops()
    ours = Client("ours", [sys.executable, os.path.join(BENCH, "sample_serve.py")])
    official = start_official(args) if names else None
    rows, throughput_rows = [], []
    try:
        for name in names:
            rows.append(compare(name, args, ours, official, scratch))
            common.print_table(rows[-1:], ["config", "ours_s_per_img", "official_s_per_img", "speedup",
                                           "identical_codes", "max_rel_err"])
        if official is not None:
            official.close()  # frees its memory for the throughput runs
        if args.throughput:
            throughput_rows = throughput(args, ours, scratch)
    finally:
        for worker in (ours, official):
            if worker is not None:
                worker.close()
    matmul_end = common.matmul_gflops()
    print()
    if rows:
        common.print_table(rows, ["config", "batch", "params_M", "vocab", "K", "ours_s_per_img", "official_s_per_img",
                                  "ours_s_per_img_min", "official_s_per_img_min", "speedup", "speedup_min",
                                  "speedup_max", "identical_codes", "code_agreement", "max_rel_err", "worst_step",
                                  "logits_equal", "target_speedup"],
                           title=f"t2i sampling vs the official loop (9 scales, 3 passes, CFG {CFG}), float32, "
                                 "random weights; parity in greedy mode")
    if throughput_rows:
        common.print_table(throughput_rows, ["config", "batch", "s_per_call", "img_per_s", "s_per_img", "xla_temp_gib",
                                             "peak_gib", "available_gib"],
                           title="generate's sampler alone (paper strategy), images/s")
    common.write_json("sample_official", {
        "machine": common.machine_info(matmul_start), "matmul_end": matmul_end,
        "official_worker": official.hello if official else None, "ours_worker": ours.hello, "rows": rows,
        "throughput": throughput_rows}, args.out)


if __name__ == "__main__":
    main()
