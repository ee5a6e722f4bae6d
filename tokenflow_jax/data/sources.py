"""Random-access image sources for ``grain.MapDataset.source``.

Every source has ``len`` and ``__getitem__`` and is picklable (grain worker processes get a copy). A
record is a dict with at least ``image``: encoded bytes, a file path or a decoded uint8 array
``[H, W, 3]``; optionally ``caption`` (str) and ``label`` (int). Records are not decoded or checked
here: ``data/decode.py`` turns whatever is in ``image`` into pixels and counts what it had to skip.

ArrayRecord files (our own format) live in ``data/array_record.py``.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from tokenflow_jax.errors import ConfigError, InputNotFoundError
from tokenflow_jax.shapes import scenes as shapes

# Every extension PIL can open (jpg, jpeg, png, webp, bmp, tif, gif, ppm, ...), lower case with the dot.
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())


class ImageFolderSource:
    """All images under ``root`` (recursive), in sorted relative-path order.

    Record: ``{"image": absolute path, "caption": str, "label": int, "path": path relative to root}``.
    ``caption`` is the stripped text of a sidecar ``<stem>.txt`` next to the image ('' if none);
    ``label`` is the index of the image's top-level sub-folder among the sorted sub-folders
    (ImageNet-style ``root/<class>/...``), -1 for images directly in ``root``.
    Files are neither opened nor checked here, so a broken image costs nothing until it is read.
    """

    def __init__(self, root: str, caption_ext: str = ".txt"):
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(root):
            raise InputNotFoundError(f"image folder {root!r} does not exist or is not a directory")
        self.root, self.caption_ext = root, caption_ext
        paths, captions = [], set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()  # os.walk order is filesystem order; the final sort makes it irrelevant anyway
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                ext = os.path.splitext(name)[1].lower()
                if ext == caption_ext:
                    captions.add(rel)
                elif ext in IMAGE_EXTENSIONS:
                    paths.append(rel)
        if not paths:
            raise InputNotFoundError(f"no images found under {root!r} (looked for extensions known to PIL)")
        self.paths = sorted(paths)
        self.caption_paths = [
            cap if (cap := os.path.splitext(p)[0] + caption_ext) in captions else None for p in self.paths
        ]
        classes = sorted({p.split(os.sep)[0] for p in self.paths if os.sep in p})
        class_index = {c: i for i, c in enumerate(classes)}
        self.classes = classes
        self.labels = [class_index[p.split(os.sep)[0]] if os.sep in p else -1 for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        caption = ""
        if (cap := self.caption_paths[index]) is not None:
            with open(os.path.join(self.root, cap), encoding="utf-8", errors="replace") as f:
                caption = f.read().strip()
        rel = self.paths[index]
        return {"image": os.path.join(self.root, rel), "caption": caption, "label": self.labels[index], "path": rel}

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root!r}, {len(self)} images)"


class TfdsSource:
    """A prepared TFDS dataset (e.g. ``imagenet2012``) through ``tfds.data_source`` (no TensorFlow).

    Record: ``{"image": encoded bytes (or a uint8 array), "caption": str, "label": int}``.

    Args:
      name, split, data_dir: as for ``tfds.data_source``; the dataset must already be prepared (nothing is
        downloaded: ImageNet needs a manual download anyway).
      image_key, label_key, caption_key: feature names; a missing label gives -1, no caption key gives ''.
      raw_image_bytes: ask TFDS for the encoded image bytes (``SkipDecoding``) so decoding, and the
        handling of broken images, happens in our pipeline. ``tfds.testing.mock_data`` cannot skip
        decoding without TensorFlow; pass False there.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None = None,
        *,
        image_key: str = "image",
        label_key: str | None = "label",
        caption_key: str | None = None,
        raw_image_bytes: bool = True,
    ):
        import tensorflow_datasets as tfds  # lazy: 0.5 s import, only for this source

        decoders = {image_key: tfds.decode.SkipDecoding()} if raw_image_bytes else None
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
        except Exception as e:  # tfds raises a zoo of types for "not prepared"
            raise InputNotFoundError(
                f"cannot open TFDS dataset {name!r} split {split!r} under data_dir={data_dir!r}: {e}. "
                "Prepare it first (e.g. tfds build, or download_and_prepare with file_format='array_record')."
            ) from e
        self.name, self.split = name, split
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        label = example.get(self.label_key, -1) if self.label_key else -1
        caption = example.get(self.caption_key, "") if self.caption_key else ""
        if isinstance(caption, (list, tuple, np.ndarray)):  # multi-caption datasets: the first one
            caption = caption[0] if len(caption) else ""
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8", errors="replace")
        return {"image": example[self.image_key], "caption": str(caption), "label": int(label)}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)"


class ShapesSource:
    """The procedural shapes dataset (``data/shapes.py``); example ``i`` depends only on ``(i, seed)``.

    Record: ``{"image": uint8 [image_size, image_size, 3], "caption": str, "label": number of objects,
    "objects": shapes.metadata(...)}`` (a list of dicts: shape, colour, cell, position, bbox).
    """

    def __init__(self, num_examples: int, image_size: int, seed: int = 0, max_objects: int = shapes.MAX_OBJECTS):
        if num_examples <= 0 or image_size <= 0:
            raise ConfigError(f"ShapesSource needs num_examples, image_size > 0; got {num_examples}, {image_size}")
        self.num_examples, self.image_size, self.seed, self.max_objects = num_examples, image_size, seed, max_objects

    def __len__(self) -> int:
        return self.num_examples

    def scene(self, index: int) -> list[shapes.ShapeObject]:
        """The scene of example ``index`` (no rendering)."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for ShapesSource of {self.num_examples} examples")
        return shapes.sample_scene(shapes.scene_rng(index, self.seed), max_objects=self.max_objects)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        return {
            "image": shapes.render(scene, self.image_size),
            "caption": shapes.caption(scene),
            "label": len(scene),
            "objects": shapes.metadata(scene, self.image_size),
        }

    def __repr__(self) -> str:
        return f"ShapesSource({self.num_examples}, image_size={self.image_size}, seed={self.seed})"
