"""Answering questions about images with a trained VLM: ``tokenflow-jax chat`` and the batched answerer
that ``eval-vqa`` uses.

    vqa = VqaModel.load(config, "RUN/checkpoints")                 # restores params, frozen tokenizer
    answers = vqa.answer(images_uint8 [B, H, W, 3], ["How many circles are there?", ...])
    for piece in vqa.stream(image, "What colour is the square?"): print(piece, end="")

Images are preprocessed as in training (``data.aspect``: pad to square with the mean grey or plain
resize, to the tokenizer's size, [-1, 1]); each question becomes the template's generation prompt with
the image placeholder expanded to the T feature positions, prompts are left-padded to a common length
and decoded with the KV cache (``models/vlm_generate.py``). A batch is sharded over the mesh's data axes;
every process passes the same full batch and gets every answer back.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from tokenflow_jax import checkpoint, parallel
from tokenflow_jax.data import conversation, llava
from tokenflow_jax.data import images as image_io
from tokenflow_jax.errors import DataError
from tokenflow_jax.models import vlm
from tokenflow_jax.models.vlm_generate import AnswerDecoder
from tokenflow_jax.recipes.vlm import setup as vlm_setup
from tokenflow_jax.train import loop
from tokenflow_jax.utils import batching

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VqaModel:
    config: Any
    model: Any  # vlm.VLM, or a unified model (same understanding entry points)
    params: Any
    tok_model: Any
    tok_vars: Any
    tokenizer: Any
    generator: AnswerDecoder
    mesh: Any
    image_size: int
    encode: Any  # jitted (tokenizer variables, images [B, S, S, 3]) -> features [B, T, C]

    @classmethod
    def load(cls, config, checkpoint_dir: str) -> VqaModel:
        """Builds the model of ``config`` and restores its parameters from ``checkpoint_dir`` (mismatches are
        listed key by key before anything compiles)."""
        mesh, rules = loop.mesh_and_rules(config)
        tok_model, tok_vars, tok_config = vlm_setup.load_image_tokenizer(config, mesh)
        tokenizer = vlm_setup.text_tokenizer(config)
        model = vlm.VLM(vlm_setup.model_config(config, tok_config, tokenizer))
        params = checkpoint.restore_model(model, vlm.init_args(model.config), checkpoint_dir, mesh=mesh,
                                          rules=rules)["params"]
        logger.info("loaded the VLM from %s (%d image tokens, template %s)", checkpoint_dir,
                    model.config.num_image_tokens, config.text.template)
        return cls.from_parts(config, model, params, tok_model, tok_vars, tok_config, tokenizer, mesh)

    @classmethod
    def from_parts(cls, config, model, params, tok_model, tok_vars, tok_config, tokenizer, mesh) -> VqaModel:
        """An answerer over a model already restored: a VLM, or a unified model (recipes/unified/serve.py), whose
        ``config`` is its VLM view. The answer decoder reads ``config.generate`` and the template's stop ids."""
        g = config.generate
        generator = AnswerDecoder(model, max_new_tokens=int(g.max_new_tokens),
                                  stop_ids=conversation.stop_ids(tokenizer, config.text.template),
                                  pad_id=int(tokenizer.pad_token_id), temperature=float(g.temperature),
                                  top_k=int(g.top_k), top_p=float(g.top_p))
        kind = config.model.features
        encode = jax.jit(lambda v, x: vlm.visual_features(tok_model, v, x, kind))
        return cls(config, model, params, tok_model, tok_vars, tokenizer, generator, mesh,
                   int(tok_config.model.image_size), encode)

    # -- inputs --------------------------------------------------------------------------------------

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] (any size) -> float32 [S, S, 3] in [-1, 1], as the training pipeline does."""

        return llava.preprocess_image(image, self.image_size, self.config.data.aspect)

    def prompts(self, questions: Sequence[str], bucket: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded prompt ids and mask [B, P]: P = the longest prompt, or with ``bucket`` that length rounded up
        to one of a few per power of two (``batching.bucket_length``) where the positions allow, so that batches of
        questions of many lengths share a few compiled programs (positions come from the padding: a row's answer
        does not depend on P)."""

        rows = [np.asarray(conversation.generation_prompt(
            q, self.tokenizer, self.config.text.template, num_image_tokens=self.model.config.num_image_tokens))
            for q in questions]
        length = max(len(r) for r in rows)
        # The KV cache holds the padded prompt and the answer; past max_positions the model has no positions.
        limit, new_tokens = int(self.model.config.llm.max_positions), self.generator.max_new_tokens
        if length + new_tokens > limit:
            which = "" if len(rows) == 1 else f" (question {int(np.argmax([len(r) for r in rows]))})"
            raise DataError(f"the prompt{which} is {length} tokens, {self.model.config.num_image_tokens} of them the "
                            f"image's; with config.generate.max_new_tokens={new_tokens} it needs {length + new_tokens} "
                            f"positions, more than config.model.llm.max_positions={limit}: shorten the question or "
                            "lower config.generate.max_new_tokens")
        padded = batching.bucket_length(length) if bucket else length
        if padded + new_tokens <= limit:
            length = padded
        ids = np.full((len(rows), length), int(self.tokenizer.pad_token_id), np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for b, r in enumerate(rows):
            ids[b, length - len(r):], mask[b, length - len(r):] = r, 1
        return ids, mask

    # -- entry points --------------------------------------------------------------------------------

    def answer(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> list[str]:
        """Greedy (or configured) answers for a batch (padded by repetition to divide over the data axes)."""
        n = len(questions)
        ways = int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp")]))
        rows = batching.pad_rows(list(range(n)), batching.round_up(n, ways))
        pixels = np.stack([self.preprocess(np.asarray(images[i])) for i in rows])
        ids, mask = self.prompts([questions[i] for i in rows], bucket=True)
        with jax.set_mesh(self.mesh):
            features = self.encode(self.tok_vars, _sharded(pixels, self.mesh))
            tokens, lengths = self.generator.batch(self.params, _sharded(ids, self.mesh), _sharded(mask, self.mesh),
                                                   features)
            tokens, lengths = (np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in (tokens, lengths))
        return [self.tokenizer.decode(t[:k].tolist(), skip_special_tokens=True).strip()
                for t, k in zip(tokens[:n], lengths[:n])]

    def stream(self, image: np.ndarray, question: str) -> Iterator[str]:
        """The answer to one question, yielded as text pieces while it is decoded."""
        pixels = self.preprocess(np.asarray(image))[None]
        ids, mask = self.prompts([question])
        features = self.encode(self.tok_vars, pixels)
        tokens: list[int] = []
        shown = ""
        for token in self.generator.stream(self.params, ids, mask, features):
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                yield text[len(shown):]
                shown = text


def _sharded(x: np.ndarray, mesh) -> jax.Array:
    """A full host batch (the same on every process) -> a global array split over the data axes."""
    sharding = parallel.data_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def chat(config, checkpoint_dir: str, image_path: str, prompt: str, out=None, vqa: VqaModel | None = None) -> int:
    """``tokenflow-jax chat``: streams the answer to ``prompt`` about the image at ``image_path`` to ``out``
    (default: the current ``sys.stdout``, looked up at call time). ``vqa``: a model already loaded (a unified
    run's); otherwise the VLM in ``checkpoint_dir`` is restored."""

    out = sys.stdout if out is None else out
    image = np.asarray(image_io.read_image(image_path))
    vqa = vqa or VqaModel.load(config, checkpoint_dir)
    for piece in vqa.stream(image, prompt):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0
