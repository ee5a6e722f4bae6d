"""A timing worker that runs the OFFICIAL TokenFlow text-to-image sampler (PyTorch), for ``bench/sample_official.py``.

The official code is not in this repository: get ByteFlow-AI/TokenFlow (measured at commit
9812da01c0695f4989060cc4eea053715e9e4441) and point ``--official`` (or ``TOKENFLOW_OFFICIAL``) at the checkout.
Its ``t2i/llava_t2i/model/language_model/modeling_llama.py`` exits unless transformers is exactly 4.43.4, so
put that version on a path of its own and pass it with ``--site`` (nothing else of it is needed)::

    python -m pip install --no-deps --target SITE transformers==4.43.4 tokenizers==0.19.1 \\
        huggingface-hub==0.24.5 setuptools==70.3.0          # setuptools: the official code imports pkg_resources

What runs is the official ``LlavaLlamaForCausalLM.from_pretrained(folder, attn_implementation='eager',
mm_vision_tower=...)`` and its ``autoregressive_infer_cfg`` (``t2i/llava_t2i/model/language_model/llava_llama.py``),
unmodified: every pass re-embeds and re-runs the whole sequence without a KV cache and computes logits over the
whole vocabulary at every position. The adapter around it, all in this file:

* The image tokenizer (``tokenflow/tokenizer/vq_model.py``, imported as ``tokenizer.vq_model`` by the official
  ``multimodal_encoder/tokenflow.py``) is replaced by :class:`CodebookOnlyVQ`, registered under that module
  name before the official package is imported. The sampling loop reads from it only the scales, the code
  width and ``quantize.get_codebook_entry`` (the same normalise-both-codebooks-and-concatenate as the real
  one, on the benchmark's random codebooks); its ``decode`` (pixels, excluded from the timing on both sides)
  returns a 1x1 black image. The real tokenizer would also need timm and torchvision.
* ``reinit_image_token_start_end`` needs the HF text tokenizer only to look up three ids; the worker sets
  ``pad_token_id``, ``image_token_start`` and ``image_token_end`` to the values it would find.
* The official prints to stdout; the worker sends those lines to stderr, keeping stdout for the protocol.
* ``record``: the official module-level ``sample_with_top_k_top_p_`` is wrapped to save the guided logits of
  every (scale, pass) before they are filtered; the wrapped function runs unchanged.

Protocol (as ``bench/tokenizer_serve.py``): one JSON request per stdin line,
``{"folder": DIR, "cond": [[ids], ...], "uncond": [ids], "cfg": 7.5, "top_k": [...], "top_p": [...],
"seed": 0, "repeats": 1, "record": FILE or null}``; the answer line adds ``"runs"`` (seconds per call) and
``"codes"`` ([B, N] code indices of the last call). The first request for a (folder, batch) loads the model
and makes one untimed warm-up call unless ``"warmup": false`` (nothing compiles here: a first call only
touches its memory first). DIR holds the exported model (``config.json``, safetensors) and ``codebook.npz``
(``semantic`` [K, 32], ``pixel`` [K, 8], raw; ``scales``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import types
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import worker_protocol  # bench/ (this script's folder) is on sys.path: the standard library only
from torch import nn

COMMIT = "9812da01c0695f4989060cc4eea053715e9e4441"


# ------------------------------------------------------------------------------- the tokenizer stand-in
class _Quantize(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding_vqkd = nn.Embedding(1, 1)
        self.embedding_vqgan = nn.Embedding(1, 1)

    def get_codebook_entry(self, indices, shape=None, channel_first=True):
        # As the official TokenFlow quantizer with l2_norm: normalise each codebook, concatenate, index.
        embedding = torch.cat([F.normalize(self.embedding_vqkd.weight, p=2, dim=-1),
                               F.normalize(self.embedding_vqgan.weight, p=2, dim=-1)], dim=-1)
        return embedding[indices]


class CodebookOnlyVQ(nn.Module):
    """What the official ``VQTower`` reads of the TokenFlow tokenizer, built from ``codebook.npz`` beside the
    weights (``tokenflow_model`` torch.loads the file named by ``mm_vision_tower``: see :func:`write_stub_file`)."""

    def __init__(self, **_ignored: Any):  # the official factory passes codebook_size=32768, teacher=... (unused)
        super().__init__()
        self.quantize = _Quantize()
        self.scale_rq_layers: list[int] = []

    def load_state_dict(self, state, strict=True, assign=False):
        self.quantize.embedding_vqkd = nn.Embedding.from_pretrained(state["quantize.embedding_vqkd.weight"])
        self.quantize.embedding_vqgan = nn.Embedding.from_pretrained(state["quantize.embedding_vqgan.weight"])
        self.scale_rq_layers = [int(s) for s in state["scales"]]
        return None

    @property
    def embed_dim(self) -> int:
        return self.quantize.embedding_vqkd.weight.shape[1] + self.quantize.embedding_vqgan.weight.shape[1]

    @property
    def n_embed(self) -> int:
        return self.quantize.embedding_vqkd.weight.shape[0]

    @property
    def dtype(self):
        return self.quantize.embedding_vqkd.weight.dtype

    @property
    def device(self):
        return self.quantize.embedding_vqkd.weight.device

    def decode(self, quant):  # pixels are not part of the sampler benchmark
        return None, torch.zeros(quant.shape[0], 3, 1, 1, dtype=quant.dtype)


def write_stub_file(folder: str) -> str:
    """``codebook.npz`` -> ``tokenizer_stub.pt`` in the {"model": state} form the official loader reads;
    its ``scales`` entry is read by the stand-in only, and the file is made before the config can be built,
    because ``LlavaMetaModel.__init__`` builds the vision tower (and so reads the scales) on construction."""
    path = os.path.join(folder, "tokenizer_stub.pt")
    data = np.load(os.path.join(folder, "codebook.npz"))
    torch.save({"model": {"quantize.embedding_vqkd.weight": torch.tensor(data["semantic"]),
                          "quantize.embedding_vqgan.weight": torch.tensor(data["pixel"]),
                          "scales": torch.tensor(data["scales"])}}, path)
    return path


def install_official(official: str) -> types.ModuleType:
    """Imports the official ``llava_llama`` module from the checkout ``official``, with the tokenizer stand-in."""
    t2i_dir = os.path.join(official, "t2i")
    if not os.path.isdir(os.path.join(t2i_dir, "llava_t2i")):
        raise SystemExit(f"--official {official!r}: no t2i/llava_t2i there (expected a ByteFlow-AI/TokenFlow checkout)")
    stub = types.ModuleType("tokenizer.vq_model")
    stub.VQ_models = {"TokenFlow": CodebookOnlyVQ}
    package = types.ModuleType("tokenizer")
    package.__path__ = []  # a package, so `from tokenizer.vq_model import ...` resolves to the stub
    package.vq_model = stub
    sys.modules["tokenizer"], sys.modules["tokenizer.vq_model"] = package, stub
    sys.path.insert(0, t2i_dir)
    with contextlib.redirect_stdout(sys.stderr):
        from llava_t2i.model.language_model import llava_llama
    return llava_llama


# ----------------------------------------------------------------------------------------------- worker
class Worker:
    def __init__(self, official: str):
        self.llava_llama = install_official(official)
        self.models: dict[str, Any] = {}
        self.warm: set[tuple[str, int]] = set()
        self.code_start = 0  # id of <vq_token_0> of the model in use
        self.recording: list[np.ndarray] | None = None
        original = self.llava_llama.sample_with_top_k_top_p_

        def recorded(logits_BlV, *args, **kwargs):
            if self.recording is not None:
                self.recording.append(logits_BlV[..., self.code_start:].detach().float().numpy().copy())
            return original(logits_BlV, *args, **kwargs)

        self.llava_llama.sample_with_top_k_top_p_ = recorded  # looked up at call time by the official loop

    def load(self, folder: str):
        if folder not in self.models:
            stub = write_stub_file(folder)
            with contextlib.redirect_stdout(sys.stderr):
                model = self.llava_llama.LlavaLlamaForCausalLM.from_pretrained(
                    folder, attn_implementation="eager", mm_vision_tower=stub, torch_dtype=torch.float32)
            model = model.eval()
            model.config.use_cache = False
            with open(os.path.join(folder, "config.json")) as f:
                hf = json.load(f)
            # What reinit_image_token_start_end(tokenizer) sets: [PAD] sits just before <vq_token_0>.
            k = hf["vq_codebook_size"]
            model.image_token_start = hf["vocab_size"] - k
            model.image_token_end = hf["vocab_size"] - 1
            model.pad_token_id = model.image_token_start - 1
            self.models[folder] = model
        return self.models[folder]

    def call(self, model, request: dict[str, Any]) -> torch.Tensor:
        cond = [torch.tensor(ids, dtype=torch.long) for ids in request["cond"]]
        uncond = [torch.tensor(request["uncond"], dtype=torch.long) for _ in cond]
        vision_tower = model.get_vision_tower()
        captured: list[torch.Tensor] = []
        original = vision_tower.decode_to_img_pt

        def keep_codes(codes_Bl):  # the codes the official passes on to its tokenizer decode
            captured.append(codes_Bl.clone())
            return original(codes_Bl)

        vision_tower.decode_to_img_pt = keep_codes
        try:
            with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
                model.autoregressive_infer_cfg(B=len(cond), prefix_text_codes=cond + uncond,
                                               g_seed=request.get("seed", 0), cfg=float(request["cfg"]),
                                               topk_list=list(request["top_k"]), topp_list=list(request["top_p"]))
        finally:
            vision_tower.decode_to_img_pt = original
        return captured[0]

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        model = self.load(request["folder"])
        self.code_start = model.image_token_start
        key = (request["folder"], len(request["cond"]))
        if key not in self.warm:
            self.warm.add(key)
            if request.get("warmup", True):
                self.call(model, request)
        runs, codes = [], None
        for _ in range(int(request.get("repeats", 1))):
            self.recording = [] if request.get("record") else None
            t0 = time.perf_counter()
            codes = self.call(model, request)
            runs.append(time.perf_counter() - t0)
            if self.recording is not None:
                np.savez(request["record"], *self.recording)
                self.recording = None
        out = {k: v for k, v in request.items() if k not in ("cond", "uncond")}
        return {**out, "runs": runs, "codes": codes.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default=os.environ.get("TOKENFLOW_OFFICIAL", ""),
                        help="ByteFlow-AI/TokenFlow checkout (default: $TOKENFLOW_OFFICIAL)")
    parser.add_argument("--site", default=os.environ.get("TOKENFLOW_OFFICIAL_SITE", ""),
                        help="a folder with transformers==4.43.4 (pip --target), put first on sys.path")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: the CPUs we may use)")
    args = parser.parse_args()
    if not args.official:
        parser.error("--official (or TOKENFLOW_OFFICIAL) is required: a ByteFlow-AI/TokenFlow checkout")
    if args.site:
        sys.path.insert(0, args.site)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    worker = Worker(args.official)
    import transformers

    worker_protocol.serve({"ready": True, "torch": torch.__version__, "transformers": transformers.__version__,
                           "threads": torch.get_num_threads(), "official_commit_measured": COMMIT}, worker.run)


if __name__ == "__main__":
    main()
