"""``tokenflow-jax reconstruct``: encode and decode images, write PNGs, report tokens and PSNR.

Inputs are files, folders (searched recursively) or ``builtin`` (sample photos shipped with
scikit-image). Every input is centre-cropped to the config's resolution as the reference's evaluation
does. A file that cannot be read is named and skipped; the exit status is non-zero only when no input
could be read at all.
"""
from __future__ import annotations

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


def load_inputs(specs: Sequence[str], size: int) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Centre-cropped uint8 [size, size, 3] crops, and the messages of inputs that were skipped."""
    crops, skipped = [], []
    for name, source in iter_inputs(specs):
        try:
            img = source if isinstance(source, Image.Image) else image_io.read_image(source)
            crops.append((name, image_io.center_crop(img, size)))
        except image_io.ImageReadError as e:
            skipped.append(str(e))
    return crops, skipped


def run(config, image_specs: Sequence[str], out_dir: str, checkpoint_dir: str | None = None,
        batch_size: int = 4) -> int:
    size = config.model.image_size
    crops, skipped = load_inputs(image_specs, size)
    for message in skipped:
        print(f"skipped: {message}", file=sys.stderr)
    if not crops:
        print("error: no input image could be read", file=sys.stderr)
        return 1
    model, variables = frozen.load_tokenizer(config, checkpoint_dir, seed=config.get("seed", 0))
    encode_decode = frozen.encode_decode_fn(model)
    os.makedirs(out_dir, exist_ok=True)
    print(f"{'image':<32} {'tokens':>7} {'PSNR (dB)':>10}")
    scores, start = [], time.time()
    for i in range(0, len(crops), batch_size):
        chunk = crops[i : i + batch_size]
        batch = np.stack([image_io.uint8_to_model(c) for _, c in chunk])
        batch = batching.pad_rows(batch, batch_size)  # keep one compiled shape
        recon, indices = encode_decode(variables, batch)
        recon = image_io.model_to_uint8(np.asarray(recon))
        for (name, crop), out, idx in zip(chunk, recon, np.asarray(indices)):
            stem = os.path.splitext(name.replace(os.sep, "__"))[0]
            Image.fromarray(crop).save(os.path.join(out_dir, f"{stem}_input.png"))
            Image.fromarray(out).save(os.path.join(out_dir, f"{stem}_recon.png"))
            score = psnr(crop / 255.0, out / 255.0, data_range=1.0)
            scores.append(score)
            print(f"{name[:32]:<32} {idx.shape[0]:>7d} {score:>10.2f}")
    print(f"{len(crops)} image(s) reconstructed, {len(skipped)} skipped, mean PSNR {np.mean(scores):.2f} dB, "
          f"{time.time() - start:.1f} s; PNGs in {out_dir}")
    return 0
