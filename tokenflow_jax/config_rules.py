"""The range of every numeric config field, and the checks between fields, run before anything is created.

:func:`check` is what ``config.build_config`` runs after the overrides, so every command rejects a bad value
before it creates a workdir, opens a metrics file or compiles a program, with one line naming the field::

    config.train.log_every=0: must be >= 1 (log the metrics every N steps)

:data:`RULES` holds one :class:`Range` per field, found by a key that is a dotted path suffix with ``fnmatch``
wildcards: ``num_steps`` covers ``train.num_steps`` and the demo's ``t2i.num_steps``, ``teacher.stride`` only that
path, ``*_weight`` every loss weight. The first key that matches wins, so path keys come before leaf keys. A
sequence field (``quantizer.scales``, ``sample.top_p``) is checked element by element. Every numeric field of every
config in configs/ has a rule (tests/test_config_rules.py fails otherwise), so a new field needs a line here.

:func:`check` then runs the structural checks a range cannot say: GroupNorm's group count must divide each CNN's
channel counts, the semantic ViT's patch grid must be the token grid, attention heads must divide the width,
an answer must leave room for a prompt in ``max_positions``, a cosine schedule cannot be shorter than its warmup, one
mesh entry at most may be -1. (What only training needs, batches that divide over the mesh and rows that fit the
decoder, ``tokenflow-jax train`` checks next: tokenflow_jax/train/preflight.py.)
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterator
from typing import Any

import ml_collections

from tokenflow_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values: ``low <= v <= high`` (either bound optional, ``*_open`` excludes it), or one of ``choices``
    when given; ``also`` are values allowed besides (mesh.shape's -1). ``note`` says what the field is, or what its
    special values mean, in the error. On a sequence every element must pass; ``increasing`` asks for strictly
    increasing elements, ``nonempty`` for at least one."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    also: tuple = ()
    increasing: bool = False
    nonempty: bool = False
    note: str = ""

    def allows(self, value: Any) -> bool:
        if value in self.also:
            return True
        if self.choices:
            return value in self.choices
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        if self.choices:
            text = "must be one of " + ", ".join(map(str, self.choices))
        elif self.low is not None and self.high is not None:
            text = f"must be in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}" \
                   f"{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"must be {'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            text = f"must be {'<' if self.high_open else '<='} {_num(self.high)}"
        if self.also:
            text += " (or " + ", ".join(map(str, self.also)) + ")"
        return text + (f" ({self.note})" if self.note else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def at_least(low: float, note: str = "", **kw) -> Range:
    return Range(low=low, note=note, **kw)


def positive(note: str = "") -> Range:
    return Range(low=0, low_open=True, note=note)


def fraction(note: str = "", *, high_open: bool = False) -> Range:
    return Range(low=0, high=1, high_open=high_open, note=note)


def one_of(*choices, note: str = "") -> Range:
    return Range(choices=choices, note=note)


COUNT = at_least(1)
NON_NEGATIVE = at_least(0)
DECAY = fraction(high_open=True)  # an exponential decay or Adam beta: 1 would never move

RULES: tuple[tuple[str, Range], ...] = (
    # ------------------------------------------------------------------- fields whose leaf name is used twice
    ("train.stage", one_of(1, 2, note="tokenizer stage 1: everything, 2: the pixel decoder alone")),
    ("stage", one_of(0, 1, 2, note="VLM stage 0: from scratch, 1: alignment, 2: instruction tuning")),
    ("sample.loops", one_of(0, 1, 2, 3, note="passes per scale; 0: use sample.top_k / top_p")),
    ("loops", Range(choices=(1, 2, 3), nonempty=True, note="passes per scale of each sampling strategy")),
    ("sample.top_k", Range(low=0, nonempty=True, note="one per pass; 0 disables top-k")),
    ("sample.top_p", Range(low=0, high=1, nonempty=True, note="one per pass; 0 disables top-p")),
    ("teacher.stride", one_of(4, 8, 16, note="VGG16 relu3_3 at half the image size, relu4_3 at the image size or "
                              "relu5_3 at twice it")),
    ("mesh.shape", at_least(1, also=(-1,), nonempty=True, note="devices per mesh axis; -1: the rest")),
    # ------------------------------------------------------------------------ run length, logs, checkpoints
    ("num_steps", at_least(1, "training steps")),
    ("log_every", at_least(1, "log the metrics every N steps")),
    ("checkpoint_every", at_least(1, "save a checkpoint every N steps")),
    ("image_every", at_least(0, "write preview images every N steps; 0: never")),
    ("keep_checkpoints", at_least(1, "checkpoints kept on disk")),
    ("preview_images", COUNT),
    ("seed", NON_NEGATIVE),
    # ---------------------------------------------------------------------------------------- data, batches
    ("*batch_size", at_least(1, "examples per step or call, over all processes")),
    ("num_examples", at_least(0, "0: the whole source")),
    ("num_images", COUNT),
    ("num_workers", at_least(0, "0: read in the main process")),
    ("skip_budget", positive("consecutive bad records that stop the run, in batches")),
    ("max_length", at_least(1, "tokens per training row")),
    ("length_buckets", at_least(1, increasing=True, note="row lengths, increasing, the last = data.max_length")),
    ("cond_drop_rate", fraction("probability of the empty caption", high_open=True)),
    ("num_per_category", COUNT),
    ("per_prompt", COUNT),
    ("grid_prompts", COUNT),
    ("grid_images", COUNT),
    # --------------------------------------------------------------------------------------- model shapes
    ("image_size", COUNT),
    ("pixel_resolution", at_least(0, "0: model.image_size")),
    ("text_length", COUNT),
    ("semantic_out_dim", COUNT),
    ("vocab_size", at_least(0, "0: the text tokenizer's size")),
    ("width", COUNT),
    ("depth", COUNT),
    ("num_heads", COUNT),
    ("num_kv_heads", COUNT),
    ("mlp_dim", COUNT),
    ("head_dim", COUNT),
    ("max_positions", COUNT),
    ("rope_theta", positive()),
    ("patch_size", COUNT),
    ("pos_grid", COUNT),
    ("in_channels", COUNT),
    ("ch", COUNT),
    ("ch_mult", at_least(1, nonempty=True, note="channel multipliers per resolution")),
    ("num_res_blocks", COUNT),
    ("z_channels", COUNT),
    ("num_groups", at_least(1, "GroupNorm groups")),
    ("ndf", COUNT),
    ("n_layers", COUNT),
    # ------------------------------------------------------------------------------------------ quantizer
    ("codebook_size", at_least(1, "codes in the codebook")),
    ("semantic_dim", COUNT),
    ("pixel_dim", COUNT),
    ("scales", at_least(1, increasing=True, nonempty=True, note="token grid sides, increasing")),
    ("scale_drop_prob", fraction("probability")),
    ("ema_decay", DECAY),
    ("ema_epsilon", positive()),
    ("dead_code_threshold", NON_NEGATIVE),
    ("usage_window", COUNT),
    ("search_memory_bytes", COUNT),
    ("entropy_temperature", positive()),
    ("w_dis", NON_NEGATIVE),
    ("beta", NON_NEGATIVE),
    # ------------------------------------------------------------------------------------ losses, optimiser
    ("*_weight", at_least(0, "a loss weight; 0 leaves the term out")),
    ("disc_start", at_least(0, "the step the GAN loss starts")),
    ("lr", positive("learning rate")),
    ("b1", DECAY),
    ("b2", DECAY),
    ("eps", positive()),
    ("*_eps", positive()),
    ("weight_decay", NON_NEGATIVE),
    ("grad_clip", at_least(0, "global-norm clip; 0: none")),
    ("warmup_steps", NON_NEGATIVE),
    ("decay_steps", at_least(1, "length of the cosine schedule")),
    ("min_lr_ratio", fraction()),
    # -------------------------------------------------------------------------------- sampling and decoding
    ("cfg_scale", NON_NEGATIVE),
    ("temperature", at_least(0, "0: greedy")),
    ("top_k", at_least(0, "0 disables top-k")),
    ("top_p", fraction("0 disables top-p")),
    ("max_new_tokens", COUNT),
    ("num_devices", at_least(0, "0: every device")),
)


def rule_for(path: str) -> Range | None:
    """The first rule whose key matches the dotted ``path`` (as a whole or as a suffix after a dot)."""
    for key, rule in RULES:
        if fnmatch.fnmatchcase(path, key) or fnmatch.fnmatchcase(path, "*." + key):
            return rule
    return None


def numeric_fields(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every number (bools are not) or non-empty sequence of numbers in ``config``."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from numeric_fields(value, path + ".")
        elif _is_number(value) or (isinstance(value, (tuple, list)) and value and all(map(_is_number, value))):
            yield path, value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unruled(config: ml_collections.ConfigDict) -> list[str]:
    """The numeric fields of ``config`` no rule covers (tests hold this empty for every config)."""
    return [path for path, _ in numeric_fields(config) if rule_for(path) is None]


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming every field out of its range (one line, ``; ``-joined: a field derived from
    another, like configs/vlm.py's optim.decay_steps from train.num_steps, is named beside it), then the first
    structural problem."""
    problems = [problem for path, rule in _ruled_fields(config)
                if (problem := _range_problem(path, _get(config, path), rule))]
    if problems:
        raise ConfigError("; ".join(problems))
    for structural in (_group_norm, _token_grid, _heads, _answer_length, _schedule, _mesh):
        structural(config)


def _range_problem(path: str, value: Any, rule: Range) -> str | None:
    if _is_number(value):
        return None if rule.allows(value) else f"config.{path}={value!r}: {rule.describe()}"
    if not isinstance(value, (tuple, list)):
        return None  # a string, None or bool where a number may go (the override checked its type)
    if not value:
        return f"config.{path}=(): needs at least one entry; {rule.describe()}" if rule.nonempty else None
    for i, item in enumerate(value):
        if _is_number(item) and not rule.allows(item):
            return f"config.{path}={tuple(value)}: entry {i} ({item!r}) {rule.describe()}"
    if rule.increasing and any(b <= a for a, b in zip(value, value[1:])):
        return f"config.{path}={tuple(value)}: must be strictly increasing ({rule.note})"
    return None


def _ruled_fields(config, prefix: str = "") -> Iterator[tuple[str, Range]]:
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _ruled_fields(value, path + ".")
        elif (rule := rule_for(path)) is not None:
            yield path, rule


def _get(config, path: str, default: Any = None) -> Any:
    node = config
    for key in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            return default
        node = node[key]
    return node


def _sections(config, prefix: str = "") -> Iterator[tuple[str, ml_collections.ConfigDict]]:
    yield prefix.rstrip("."), config
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _sections(value, f"{prefix}{key}.")


# ---------------------------------------------------------------------------------------- structural checks

def _group_norm(config) -> None:
    """Every GroupNorm of a tokenizer CNN (models/cnn.py) normalises ch x m channels for each m of ch_mult (and the
    encoder's first block ch): num_groups must divide each."""
    for path, section in _sections(config):
        if not {"ch", "ch_mult", "num_groups"} <= set(section.keys()):
            continue
        ch, groups = int(section.ch), int(section.num_groups)
        channels = sorted({ch * int(m) for m in section.ch_mult} | ({ch} if "encoder" in path else set()))
        bad = [c for c in channels if c % groups]
        if bad:
            raise ConfigError(f"config.{path}.num_groups={groups} must divide every channel count of this CNN "
                              f"(ch x ch_mult: {channels}); {bad} do not split into {groups} equal groups")


def _token_grid(config) -> None:
    """The tokenizer's semantic ViT sees image_size // patch_size patches per side (a VALID patch conv: SigLIP's
    384 / 14 gives 27) and its pixel CNN pixel_resolution / 2^(levels - 1): both must be the last scale."""
    model, quantizer = config.get("model"), config.get("quantizer")
    if not (isinstance(model, ml_collections.ConfigDict) and "semantic_encoder" in model and quantizer):
        return
    size, patch = int(model.image_size), int(model.semantic_encoder.patch_size)
    grid, last = size // patch, int(quantizer.scales[-1])
    if grid != last:
        raise ConfigError(f"config.model.image_size={size} with config.model.semantic_encoder.patch_size={patch} "
                          f"gives a {grid}x{grid} patch grid, but config.quantizer.scales={tuple(quantizer.scales)} "
                          f"end at {last}: the last scale is the token grid")
    encoder = model.semantic_encoder
    if encoder.get("flavour") == "siglip" and int(encoder.pos_grid) != grid:
        raise ConfigError(f"config.model.semantic_encoder.pos_grid={encoder.pos_grid} must be the patch grid {grid}: "
                          "a SigLIP tower has no class token and does not interpolate its position table")
    if "pixel_encoder" in model:
        pixels = int(model.get("pixel_resolution") or size)
        factor = 2 ** (len(model.pixel_encoder.ch_mult) - 1)
        if pixels % factor or pixels // factor != last:
            raise ConfigError(f"config.model.pixel_resolution (or image_size) {pixels} must be {last} x {factor} "
                              f"(the token grid times the pixel encoder's downsampling, 2^(len(ch_mult) - 1))")


def _heads(config) -> None:
    """Attention splits the width over the heads, and groups the query heads over the key/value heads."""
    for path, section in _sections(config):
        if not {"width", "num_heads"} <= set(section.keys()) or section.get("head_dim"):
            continue
        width, heads = int(section.width), int(section.num_heads)
        if width % heads:
            raise ConfigError(f"config.{path}.width={width} must be a multiple of config.{path}.num_heads={heads}")
        kv = section.get("num_kv_heads")
        if kv and heads % int(kv):
            raise ConfigError(f"config.{path}.num_heads={heads} must be a multiple of config.{path}.num_kv_heads={kv}"
                              " (grouped-query attention)")


def _answer_length(config) -> None:
    """A decoded answer must leave room for a prompt in the decoder's positions (the prompt itself is checked
    when it is known: recipes/vlm/answer.py)."""
    max_positions, new_tokens = _get(config, "model.llm.max_positions"), _get(config, "generate.max_new_tokens")
    if max_positions is not None and new_tokens is not None and int(new_tokens) >= int(max_positions):
        raise ConfigError(f"config.generate.max_new_tokens={new_tokens} leaves no room for a prompt in "
                          f"config.model.llm.max_positions={max_positions}")


def _schedule(config) -> None:
    """A cosine schedule decays after its warmup, so it cannot be shorter."""
    optim = config.get("optim")
    if isinstance(optim, ml_collections.ConfigDict) and optim.get("schedule") == "cosine":
        decay, warmup = int(optim.get("decay_steps", 0)), int(optim.get("warmup_steps", 0))
        if decay < warmup:
            raise ConfigError(f"config.optim.decay_steps={decay} must be >= config.optim.warmup_steps={warmup} for "
                              "the cosine schedule (configs/vlm.py derives both from config.train.num_steps)")


def _mesh(config) -> None:
    """One mesh entry may be -1 (the devices left over); the shape names each axis once."""
    mesh = config.get("mesh")
    if not isinstance(mesh, ml_collections.ConfigDict) or "shape" not in mesh:
        return
    shape, axes = tuple(mesh.shape), tuple(mesh.get("axes", ()))
    if shape.count(-1) > 1:
        raise ConfigError(f"config.mesh.shape={shape}: at most one entry may be -1")
    if axes and len(shape) != len(axes):
        raise ConfigError(f"config.mesh.shape={shape} must have one entry per axis of config.mesh.axes={axes}")
