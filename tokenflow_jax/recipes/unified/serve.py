"""Serving a unified checkpoint: one restored model answers ``generate``, ``eval-shapes``, ``chat`` and ``eval-vqa``,
and judges its own images (``generate --rerank N``).

    server = UnifiedServer(config, "RUN/checkpoints")        # restores the decoder and the frozen tokenizer once
    generator = server.image_generator(sample_config)         # the t2i recipe's ImageGenerator on this model
    vqa = server.vqa_model()                                  # the VLM recipe's VqaModel on this model
    judge = server.caption_judge()                            # log p(prompt as the caption | image)

The generator, the answerer and the judge hold the same parameter arrays and tokenizer variables (nothing is
copied), so a process that generates and then answers questions about what it generated loads the model once.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax import checkpoint, parallel
from tokenflow_jax import config as config_lib
from tokenflow_jax.data import conversation, pipeline
from tokenflow_jax.data import text as text_lib
from tokenflow_jax.errors import CheckpointNotFoundError, ConfigError
from tokenflow_jax.models import unified, vlm
from tokenflow_jax.recipes.t2i.sample import ImageGenerator, local_rows
from tokenflow_jax.recipes.unified import setup
from tokenflow_jax.recipes.vlm import setup as vlm_setup
from tokenflow_jax.recipes.vlm.answer import VqaModel
from tokenflow_jax.shapes.vqa import CAPTION_PROMPT, IMAGE_PLACEHOLDER
from tokenflow_jax.train import loop

logger = logging.getLogger(__name__)


def recorded_config(checkpoint_dir: str):
    """The unified config recorded in ``checkpoint_dir``, or None when the run there is another recipe's."""
    if checkpoint.latest_step(checkpoint_dir) is None:
        raise CheckpointNotFoundError(f"--checkpoint {checkpoint_dir!r}: no t2i or unified checkpoint there (expected "
                                      "a training run's checkpoints directory, e.g. WORKDIR/checkpoints)")
    meta = checkpoint.read_meta(checkpoint_dir)
    if meta.get("recipe") != "unified":
        return None
    return config_lib.build_config(meta["config_spec"], list(meta.get("config_overrides", [])))


class UnifiedServer:
    """A unified run's model, parameters, frozen tokenizer and text tokenizer, restored once."""

    def __init__(self, config, checkpoint_dir: str):
        self.config = config
        self.t2i_config, self.vlm_config = setup.t2i_view(config), setup.vlm_view(config)
        self.mesh, rules = loop.mesh_and_rules(config)
        self.tok_model, self.tok_vars, self.tok_config = vlm_setup.load_image_tokenizer(self.vlm_config, self.mesh)
        self.text_tokenizer = vlm_setup.text_tokenizer(self.vlm_config)
        self.model = unified.UnifiedModel(setup.model_config(config, self.tok_config, self.text_tokenizer))
        self.params = checkpoint.restore_model(self.model, unified.init_args(self.model.config), checkpoint_dir,
                                               mesh=self.mesh, rules=rules, collections=("params",))["params"]
        logger.info("loaded the unified model from %s: it generates (%d image tokens) and reads images (%d feature "
                    "tokens)", checkpoint_dir, self.model.config.num_tokens, self.model.config.num_image_tokens)

    def image_generator(self, sample_config) -> ImageGenerator:
        """The t2i recipe's generator on this model; ``sample_config`` (configs/sample.py) gives the sampling."""
        encoder = text_lib.PromptEncoder(self.text_tokenizer, self.config.model.text_length,
                                         self.config.text.image_marker)
        return ImageGenerator(sample_config, self.t2i_config, self.model, self.params, self.mesh, self.tok_model,
                              self.tok_vars, self.text_tokenizer, encoder)

    def vqa_model(self) -> VqaModel:
        """The VLM recipe's answerer on this model (greedy or as ``config.generate`` says)."""
        return VqaModel.from_parts(self.vlm_config, self.model, self.params, self.tok_model, self.tok_vars,
                                   self.tok_config, self.text_tokenizer, self.mesh)

    def caption_judge(self, question: str = CAPTION_PROMPT) -> CaptionJudge:
        return CaptionJudge(self.vqa_model(), question)


class CaptionJudge:
    """Scores candidate images for their prompt with the model's own understanding half.

    score(prompt, image) = log p(prompt | image, question) summed over the prompt's tokens (and the reply's end
    marker), where ``question`` asks for a caption ("Describe the image.", the caption examples the model trained
    on). Why this judge: it asks the model the one question whose answer is the whole prompt, so every attribute
    the prompt names (count, colour, shape, place) enters the score, with no questions to derive and no parser
    of prompts; and among candidates for one prompt it ranks exactly as the pointwise mutual information
    log p(prompt | image) - log p(prompt) would, since the second term is the same for all of them.
    """

    def __init__(self, vqa: VqaModel, question: str = CAPTION_PROMPT):
        if not isinstance(vqa.model, unified.UnifiedModel):
            raise ConfigError("--rerank needs a unified checkpoint: the model must read the images it generates")
        self.vqa, self.question = vqa, question
        model, kind = vqa.model, vqa.config.model.features

        def log_likelihood(params, tok_vars, pixels, ids, mask, labels):
            features = vlm.visual_features(vqa.tok_model, tok_vars, pixels, kind)
            logits = model.apply({"params": params}, ids, features, mask, method=unified.UnifiedModel.answer_logits)
            nll, _ = vlm.token_nll(logits, labels)
            return -jnp.sum(nll, axis=-1)  # [B]

        self._score = jax.jit(log_likelihood)

    def encode(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Right-padded ids, attention mask and labels [B, L] of "question about the image -> the prompt"."""
        vqa = self.vqa
        rows = [conversation.encode_conversation(
            [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{self.question}"}, {"from": "gpt", "value": p}],
            vqa.tokenizer, vqa.config.text.template, num_image_tokens=vqa.model.config.num_image_tokens,
            max_length=vqa.model.config.llm.max_positions) for p in prompts]
        length = max(len(r.input_ids) for r in rows)
        ids = np.full((len(rows), length), int(vqa.tokenizer.pad_token_id), np.int32)
        labels = np.full((len(rows), length), conversation.IGNORE_INDEX, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for b, r in enumerate(rows):
            n = len(r.input_ids)
            ids[b, :n], labels[b, :n], mask[b, :n] = r.input_ids, r.labels, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def __call__(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
        """This process's rows: prompts and uint8 images [B, H, W, 3] -> scores float32 [B] (higher = better).
        Every process calls it with the same number of rows (the batch is sharded as the generator's)."""
        vqa = self.vqa
        host = self.encode(prompts)
        host["image"] = np.stack([vqa.preprocess(np.asarray(image)) for image in images])
        with jax.set_mesh(vqa.mesh), nn.logical_axis_rules(parallel.rules_from_config(vqa.config.mesh)):
            batch = pipeline.to_global_batch(host, vqa.mesh)
            scores = self._score(vqa.params, vqa.tok_vars, batch["image"], batch["input_ids"],
                                 batch["attention_mask"], batch["labels"])
        return local_rows(scores).astype(np.float32)

