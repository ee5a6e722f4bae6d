"""A timing worker for this project's text-to-image sampler, the counterpart of ``bench/official_t2i_serve.py``.

Runs what ``tokenflow-jax generate`` runs per batch (``recipes/t2i/sample.make_sample_fn``: the KV-cached
sampler with one key per image), on a model read from an official-layout folder through the project's importer
(``convert/official_t2i.to_params``), so both workers sample with the same exported weights.

Protocol (as ``bench/tokenizer_serve.py``): one JSON request per stdin line,
``{"folder": DIR, "model": T2IConfig fields, "cond": [[ids], ...], "uncond": [ids], "cfg": 7.5,
"top_k": [...], "top_p": [...], "seed": 0, "repeats": 1, "record": FILE or null, "warmup": true}``;
the answer adds ``"runs"`` (seconds per call), ``"compile_s"`` and ``"memory"`` (XLA's byte counts,
``common.memory_stats``; on the request that compiles) and ``"codes"`` ([B, N] of the last call). ``cond``
rows are left-padded to the model's text length, as the project's text encoder does. A new (folder, batch,
schedule) compiles; the first request for it that does not say ``"warmup": false`` also makes one untimed
warm-up call before the timed ones. ``record`` compiles a separate program that also sends the guided
logits of every (scale, pass) to the host (``jax.debug.callback``) and saves them to FILE (``.npz``, in
call order).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, worker_protocol  # noqa: E402
from tokenflow_jax.convert import llm as convert_llm  # noqa: E402
from tokenflow_jax.convert import official_t2i  # noqa: E402
from tokenflow_jax.models import t2i, t2i_sampler, transformer  # noqa: E402
from tokenflow_jax.ops import sampling  # noqa: E402
from tokenflow_jax.recipes.t2i import sample as t2i_sample  # noqa: E402


def t2i_config(spec: dict[str, Any]) -> t2i.T2IConfig:
    """T2IConfig from ``dataclasses.asdict`` of one (the driver's ``model`` field)."""
    fields = dict(spec)
    llm = transformer.TransformerConfig(**fields.pop("llm"))
    return t2i.T2IConfig(llm=llm, **{**fields, "scales": tuple(fields["scales"])})


def normalized_codebook(folder: str) -> np.ndarray:
    """``codebook.npz`` (raw semantic [K, 32] and pixel [K, 8] codebooks) -> the [K, 40] unit-part vectors the
    sampler reads (``models/quantizer.lookup``)."""
    data = np.load(os.path.join(folder, "codebook.npz"))
    parts = [data[name] / np.maximum(np.linalg.norm(data[name], axis=-1, keepdims=True), 1e-12)
             for name in ("semantic", "pixel")]
    return np.concatenate(parts, axis=-1).astype(np.float32)


def text_batch(cond: list[list[int]], uncond: list[int], length: int) -> dict[str, np.ndarray]:
    """Prompt ids -> the sampler's batch: left-padded [B, P] ids and masks, prompt and sample indices [B]."""
    def pad(rows):
        ids, mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
        for r, row in enumerate(rows):
            if len(row) > length:
                raise ValueError(f"prompt of {len(row)} ids is longer than the text length {length}")
            ids[r, length - len(row):], mask[r, length - len(row):] = row, 1
        return ids, mask

    text_ids, text_mask = pad(cond)
    uncond_ids, uncond_mask = pad([uncond] * len(cond))
    return {"text_ids": text_ids, "text_mask": text_mask, "uncond_ids": uncond_ids, "uncond_mask": uncond_mask,
            "prompt_index": np.arange(len(cond), dtype=np.int32), "sample_index": np.zeros(len(cond), np.int32)}


@contextlib.contextmanager
def recording_guided_logits(store: list[np.ndarray]):
    """While active, tracing the sampler also emits a host callback with the guided logits [B, T, K] that each
    (scale, pass) samples from (the output of ``t2i_sampler.guided_code_logits``, before the filter)."""
    original = t2i_sampler.guided_code_logits

    def recorded(*args, **kwargs):
        guided = original(*args, **kwargs)
        jax.debug.callback(lambda x: store.append(np.asarray(x).copy()), guided, ordered=True)
        return guided

    t2i_sampler.guided_code_logits = recorded  # looked up at trace time by t2i_sampler._guided_sample
    try:
        yield
    finally:
        t2i_sampler.guided_code_logits = original


class Worker:
    """Caches loaded models and compiled samplers across requests."""

    def __init__(self) -> None:
        self.models: dict[str, tuple[t2i.NextScaleT2I, Any, jax.Array]] = {}
        self.compiled: dict[tuple, Any] = {}
        self.warmed: set[tuple] = set()
        self.recorded: list[np.ndarray] = []

    def load(self, folder: str, spec: dict[str, Any]):
        if folder not in self.models:
            cfg = t2i_config(spec)
            tensors, _ = convert_llm.open_tensors(folder)
            params = official_t2i.to_params(tensors, cfg, what=folder)
            self.models[folder] = (t2i.NextScaleT2I(cfg), params, jnp.asarray(normalized_codebook(folder)))
        return self.models[folder]

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        model, params, codebook = self.load(request["folder"], request["model"])
        schedule = sampling.SamplingSchedule(tuple(request["top_k"]), tuple(request["top_p"]))
        batch = text_batch(request["cond"], request["uncond"], model.config.text_length)
        record = bool(request.get("record"))
        key = (request["folder"], len(request["cond"]), schedule, float(request["cfg"]), request.get("seed", 0), record)
        compile_s, memory = None, None
        if key not in self.compiled:
            fn = t2i_sample.make_sample_fn(model, lambda tok_vars, indices: indices, seed=int(request.get("seed", 0)),
                                           cfg_scale=float(request["cfg"]), schedule=schedule, cached=True)
            args = (params, None, codebook, batch)
            with recording_guided_logits(self.recorded) if record else contextlib.nullcontext():
                compiled, compile_s = common.compile_timed(jax.jit(fn), *args)
            memory = common.memory_stats(compiled)
            self.compiled[key] = compiled
        compiled = self.compiled[key]
        if request.get("warmup", True) and key not in self.warmed:
            common.block(compiled(params, None, codebook, batch))
            self.warmed.add(key)
        runs, codes = [], None
        for _ in range(int(request.get("repeats", 1))):
            self.recorded.clear()
            t0 = time.perf_counter()
            codes, _ = common.block(compiled(params, None, codebook, batch))
            jax.effects_barrier()
            runs.append(time.perf_counter() - t0)
        if record:
            np.savez(request["record"], *self.recorded)
        out = {k: v for k, v in request.items() if k not in ("cond", "uncond", "model")}
        return {**out, "runs": runs, "compile_s": compile_s, "memory": memory,
                "codes": None if codes is None else np.asarray(codes).tolist()}


def main() -> None:
    common.enable_compile_cache()
    worker = Worker()
    worker_protocol.serve({"ready": True, "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]},
                          worker.run)


if __name__ == "__main__":
    main()

