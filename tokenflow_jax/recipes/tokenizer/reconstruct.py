"""``tokenflow-jax reconstruct``: encode and decode images, write PNGs, report tokens and PSNR.

Inputs are files, folders (searched recursively) or ``builtin`` (sample photos shipped with
scikit-image). Every input is centre-cropped to the config's resolution as the reference's evaluation
does. Inputs are read a batch at a time, so any number of them fits in memory; each gets its own output
names (``d1/a.png`` and ``d2/a.png`` do not overwrite each other). A file that cannot be read is named and
skipped; the exit status is non-zero only when no input could be read at all.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from tokenflow_jax.data import images as image_io
from tokenflow_jax.eval.metrics import psnr
from tokenflow_jax.recipes.tokenizer import frozen
from tokenflow_jax.utils import batching

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def iter_inputs(specs: Sequence[str]) -> Iterator[tuple[str, str | Image.Image]]:
    """(name, path or image) for each input spec; folders expand to their image files (sorted)."""
    for spec in specs:
        if spec == "builtin":
            yield from image_io.builtin_images()
        elif os.path.isdir(spec):
            for root, _, files in sorted(os.walk(spec)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_SUFFIXES):
                        yield os.path.relpath(os.path.join(root, f), spec), os.path.join(root, f)
        else:
            yield os.path.basename(spec) or spec, spec


class OutputNames:
    """Unique output stems for input names: ``d/a.png`` -> ``d__a``; a stem already given (also when it differs
    only in case: case-insensitive file systems) gets ``_2``, ``_3``, ... so no output overwrites another."""

    def __init__(self):
        self._taken: set[str] = set()

    def __call__(self, name: str) -> str:
        base = os.path.splitext(name.replace(os.sep, "__").replace("/", "__"))[0] or "image"
        stem, number = base, 1
        while stem.casefold() in self._taken:
            number += 1
            stem = f"{base}_{number}"
        self._taken.add(stem.casefold())
        return stem


def iter_crops(specs: Sequence[str], size: int, on_skip) -> Iterator[tuple[str, str, np.ndarray]]:
    """(name, unique output stem, centre-cropped uint8 [size, size, 3]) per readable input, decoded one at a time;
    ``on_skip(message)`` is called for each input that cannot be read."""
    names = OutputNames()
    for name, source in iter_inputs(specs):
        try:
            img = source if isinstance(source, Image.Image) else image_io.read_image(source)
        except image_io.ImageReadError as e:
            on_skip(str(e))
            continue
        yield name, names(name), image_io.center_crop(img, size)


def run(config, image_specs: Sequence[str], out_dir: str, checkpoint_dir: str | None = None,
        batch_size: int = 4) -> int:
    """Reconstructs every input, ``batch_size`` at a time (decode a batch, run it, write it: memory does not grow
    with the number of inputs); writes ``<stem>_input.png`` and ``<stem>_recon.png`` per input with a unique
    stem (:class:`OutputNames`). Returns 0, or 1 when no input could be read."""
    size = config.model.image_size
    skipped: list[str] = []

    def on_skip(message: str) -> None:
        skipped.append(message)
        print(f"skipped: {message}", file=sys.stderr)

    crops = iter_crops(image_specs, size, on_skip)
    chunk = list(itertools.islice(crops, batch_size))
    if not chunk:
        print("error: no input image could be read", file=sys.stderr)
        return 1
    model, variables = frozen.load_tokenizer(config, checkpoint_dir, seed=config.get("seed", 0))
    encode_decode = frozen.encode_decode_fn(model)
    os.makedirs(out_dir, exist_ok=True)
    print(f"{'image':<32} {'output':<24} {'tokens':>7} {'PSNR (dB)':>10}")
    scores, written, start = [], 0, time.time()
    while chunk:
        batch = np.stack([image_io.uint8_to_model(crop) for _, _, crop in chunk])
        batch = batching.pad_rows(batch, batch_size)  # keep one compiled shape
        recon, indices = encode_decode(variables, batch)
        recon = image_io.model_to_uint8(np.asarray(recon))
        for (name, stem, crop), out, idx in zip(chunk, recon, np.asarray(indices)):
            Image.fromarray(crop).save(os.path.join(out_dir, f"{stem}_input.png"))
            Image.fromarray(out).save(os.path.join(out_dir, f"{stem}_recon.png"))
            written += 1
            score = psnr(crop / 255.0, out / 255.0, data_range=1.0)
            scores.append(score)
            print(f"{name[-32:]:<32} {stem[-24:]:<24} {idx.shape[0]:>7d} {score:>10.2f}")
        chunk = list(itertools.islice(crops, batch_size))
    print(f"{written} image(s) reconstructed ({2 * written} PNGs written), {len(skipped)} skipped, mean PSNR "
          f"{np.mean(scores):.2f} dB, {time.time() - start:.1f} s; PNGs in {out_dir}")
    return 0
