"""ShapesEval: a GenEval-style analytic scorer for generated images of the shapes world (numpy only).

GenEval (Ghosh et al. 2023) scores text-to-image models with an object detector on six categories. The
shapes world (:mod:`tokenflow_jax.shapes.scenes`) is simple enough that the detector is exact geometry
instead of a learned model::

    prompts = make_prompts(num_per_category=50, seed=0)         # list[EvalPrompt]
    images = [generate(p.text) for p in prompts]                # uint8 [H, W, 3] each
    results = evaluate(prompts, images)                         # per-category and overall accuracy
    print(format_table(results))

How GenEval's categories map onto the shapes grammar
----------------------------------------------------
GenEval's object *class* is the shape here; the colour is the adjective, and (as in GenEval) it is scored
only by the ``colours`` and ``colour_attr`` categories. The training captions constrain the phrasing:

* Every noun phrase carries a colour ("a red circle"): a colourless "a circle" is never a caption. So
  ``single_object`` and ``colours`` share the prompt form; ``single_object`` scores the shape only,
  ``colours`` scores the shape-colour pair.
* A two-object scene is *always* captioned positionally ("a red circle on the left of a blue square");
  GenEval's "a X and a Y" form never occurs in training (``count_phrase`` yields it only inside captions
  of three or more objects). ``two_object`` and ``colour_attr`` therefore use the positional caption,
  the nearest in-distribution phrasing, and do not score the relation; ``position`` does.
* Two equal objects are captioned positionally too ("a red circle on the left of a red circle"), so
  "two red circles" is never a whole caption; it does occur inside longer ones ("two red circles and a
  blue square"). ``counting`` phrases every count N in 2-4 with ``count_phrase`` ("two red circles",
  "three red circles"): for N = 3, 4 that is the caption itself, for N = 2 the nearest in-grammar form.
* As in GenEval, the two objects of a two-object prompt are different classes (shapes), and those of a
  ``colour_attr`` prompt also have different colours, so each object is identified by its shape alone.

Every prompt is captioned from a scene drawn by ``shapes.sample_scene`` (rejection sampling until the
scene fits the category), so prompts follow the training distribution word for word.

Scoring rules (GenEval's, on detections):
  single_object  at least one object of the shape
  two_object     at least one object of each shape
  counting       exactly N objects of the shape (GenEval's include N / exclude N+1)
  colours        at least one object of the shape in the colour
  position       an object of the first shape and one of the second whose grid cells satisfy the relation
                 as ``shapes.relation`` defines it (columns first, then rows)
  colour_attr    at least one object of each (colour, shape) pair
Extra objects are not penalised (GenEval does not either), except by ``counting``.

Detector accuracy (every object's shape, colour and cell recovered exactly, per scene): 100% on clean
renders (20,000 scenes at 64 and 128 px, 5,000 at 256); >= 99.95% under Gaussian noise (sigma 20) or
blur (radius 1); under a JPEG q75 round trip 91% at 64 px and >= 99.95% at 128 and 256 px.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from tokenflow_jax.errors import ConfigError
from tokenflow_jax.shapes import scenes as shapes

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colours", "position", "colour_attr")
RELATIONS: tuple[str, ...] = ("on the left of", "on the right of", "above", "below")
COUNTS: tuple[int, ...] = (2, 3, 4)
# The rarest draw, a two-object scene of two shapes with one "above" the other, has probability ~1.3%:
# 10,000 draws all miss it with probability ~1e-59, so only a bug reaches this bound.
_MAX_DRAWS = 10_000


# ----------------------------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class ExpectedObject:
    """One noun phrase of a prompt: ``count`` objects of this shape and colour."""

    shape: str
    colour: str
    count: int = 1


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """A prompt and what an image must show to pass it.

    Attributes:
      text: the prompt: ``shapes.caption(scene)``, or ``shapes.count_phrase(scene)`` for ``counting``
        (the same text except for two objects, see the module docstring).
      category: one of :data:`CATEGORIES`.
      objects: the expected objects in order of mention (one or two).
      relation: for two-object prompts, where ``objects[0]`` is relative to ``objects[1]`` (a
        ``shapes.relation`` phrase, part of the text; scored by ``position`` only); else None.
      scene: the scene the text was captioned from. The scorer never reads it; a render of it is a
        reference image that must pass (a check of the scorer, or an upper bound for a model).
    """

    text: str
    category: str
    objects: tuple[ExpectedObject, ...]
    relation: str | None = None
    scene: tuple[shapes.ShapeObject, ...] = ()


def fits(scene: Sequence[shapes.ShapeObject], category: str) -> bool:
    """Whether ``scene`` can be captioned as a prompt of ``category`` (see the module docstring)."""
    if category in ("single_object", "colours"):
        return len(scene) == 1
    if category == "counting":
        return len(scene) in COUNTS and len({(obj.shape, obj.colour) for obj in scene}) == 1
    pair = len(scene) == 2 and scene[0].shape != scene[1].shape
    if category == "colour_attr":
        return pair and scene[0].colour != scene[1].colour
    return pair


def _is_balanced_choice(scene: Sequence[shapes.ShapeObject], category: str, index: int) -> bool:
    """Prompt ``index`` of counting / position takes the next count / relation in turn: GenEval balances
    both, and natural draws give left/right three times as often as above/below."""
    if category == "counting":
        return len(scene) == COUNTS[index % len(COUNTS)]
    if category == "position":
        return shapes.relation(*scene) == RELATIONS[index % len(RELATIONS)]
    return True


def _draw_scene(rng: np.random.Generator, category: str, index: int) -> list[shapes.ShapeObject]:
    """Draws ``shapes.sample_scene`` until the scene fits prompt ``index`` of ``category``."""
    for _ in range(_MAX_DRAWS):
        scene = shapes.sample_scene(rng)
        if fits(scene, category) and _is_balanced_choice(scene, category, index):
            return scene
    raise RuntimeError(f"no scene for category {category!r} in {_MAX_DRAWS} draws")


def prompt_from_scene(scene: Sequence[shapes.ShapeObject], category: str) -> EvalPrompt:
    """The prompt of ``category`` captioned from ``scene`` (1 object, 2 objects, or N equal objects)."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    scene = tuple(scene)
    if not fits(scene, category):
        raise ValueError(f"a {category!r} prompt cannot be captioned from scene {scene}")
    if category == "counting":
        objects = (ExpectedObject(scene[0].shape, scene[0].colour, len(scene)),)
        relation, text = None, shapes.count_phrase(scene)
    else:
        objects = tuple(ExpectedObject(obj.shape, obj.colour) for obj in scene)
        relation = shapes.relation(*scene) if len(scene) == 2 else None
        text = shapes.caption(scene)
    return EvalPrompt(text, category, objects, relation, scene)


def make_prompts(num_per_category: int, seed: int) -> list[EvalPrompt]:
    """``num_per_category`` prompts for each of :data:`CATEGORIES` (in that order), deterministic in ``seed``.

    Each category has its own generator, so its prompts do not change when another category changes.
    """
    if num_per_category < 1:
        raise ConfigError(f"num_per_category (--num-per-category) must be >= 1, got {num_per_category}")
    prompts = []
    for category_index, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([int(seed), category_index])
        for index in range(num_per_category):
            prompts.append(prompt_from_scene(_draw_scene(rng, category, index), category))
    return prompts


# ---------------------------------------------------------------------------------------------- detector

COLOUR_NAMES: tuple[str, ...] = tuple(shapes.COLOURS)
_PALETTE = np.array([shapes.COLOURS[name] for name in COLOUR_NAMES], np.float32)  # [K, 3]
_ENTRIES = np.concatenate([_PALETTE, np.array([shapes.BACKGROUND], np.float32)])  # [K + 1, 3], bg last


def _acceptance_radii() -> np.ndarray:
    """[K] float: a pixel is colour k only within half the distance from k to the nearest other entry
    (palette or background). Inside those balls nearest-entry classification is unambiguous, and pixels
    of colours the palette lacks (a model's orange, say) stay unclassified instead of becoming the
    nearest palette colour. The tightest radius is purple's, 54 (it is 108 from the background), which
    Gaussian noise of sigma 10 per channel exceeds with probability ~2e-6."""
    distances = np.linalg.norm(_ENTRIES[:, None] - _ENTRIES[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    return 0.5 * distances.min(axis=1)[: len(COLOUR_NAMES)]


_RADII = _acceptance_radii()
# Components smaller than this fraction of the image are noise, not objects. The smallest object the
# dataset draws is a triangle of side 0.55 cell: 0.5 * (0.55 / 3)^2 = 1.7% of the image; a quarter of
# that still admits objects a model draws somewhat small or damages, and drops specks (e.g. 16 px at 64).
MIN_AREA_FRACTION = 0.004
# Shape thresholds, on the component's bounding box (hole-filled mask). Prototypes: square fill 1.0,
# circle pi/4 = 0.785, apex-up triangle 0.5 with its centroid 2/3 of the way down. Measured on renders
# (200 scenes, 64-256 px): clean circle fill 0.755-0.800 and triangle 0.500-0.542 (pixelation at 64 px).
# Under Gaussian noise (sigma 20) and blur (radius 1) squares stay >= 0.91 and circles within 0.67-0.81.
# JPEG (q75) at 64 px makes the classes overlap (squares down to 0.79, circles up to 0.88): that is where
# the detector's errors are. Small triangles lose their thin apex under JPEG, which raises the fill to
# ~0.7 but keeps the centroid low (>= 0.57), hence the second test.
SQUARE_MIN_FILL = 0.89  # midway between circle and square
TRIANGLE_MAX_FILL = 0.64  # midway between triangle and circle
TRIANGLE_MIN_CENTROID_DEPTH = 0.56  # circles and squares measure 0.445-0.539 even under JPEG at 64 px


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object. Pixel coordinates: x to the right, y down.

    Attributes:
      shape, colour: names from ``shapes.SHAPES`` and ``shapes.COLOURS``.
      centroid: ``(x, y)`` mean pixel centre of the object's mask.
      bbox: ``(x0, y0, x1, y1)`` half-open, as ``ShapeObject.bbox``.
      cell: ``(row, col)`` of the 3x3 grid cell that holds the centroid.
      area: pixels in the (hole-filled) mask.
      fill_ratio: area / bbox area.
    """

    shape: str
    colour: str
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    cell: tuple[int, int]
    area: int
    fill_ratio: float

    # ``row``/``col`` let ``shapes.relation`` take detections, so positions use its definition verbatim.
    @property
    def row(self) -> int:
        return self.cell[0]

    @property
    def col(self) -> int:
        return self.cell[1]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got dtype {image.dtype} shape {image.shape}")
    return image


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> int [H, W]: index into :data:`COLOUR_NAMES`, or -1 for background and for
    pixels no palette colour explains (farther than its acceptance radius)."""
    channels = _check_image(image).astype(np.int32).transpose(2, 0, 1)  # [3, H, W]
    # Exact integer squared distances, one [H, W] plane per entry: ~2.5x faster than a [H*W, 3] @ [3, K+1]
    # matmul, whose inner dimension of 3 suits no BLAS kernel.
    squared = np.stack([sum((channels[c] - int(entry[c])) ** 2 for c in range(3)) for entry in _ENTRIES])
    nearest = squared.argmin(axis=0)  # [H, W]
    is_colour = nearest < len(COLOUR_NAMES)
    radius = _RADII[np.minimum(nearest, len(COLOUR_NAMES) - 1)]
    inside = np.take_along_axis(squared, nearest[None], axis=0)[0] < radius**2
    return np.where(is_colour & inside, nearest, -1)


def classify_shape(mask: np.ndarray) -> str:
    """bool [h, w] mask cropped to its bounding box -> 'circle', 'square' or 'triangle' (thresholds above)."""
    fill = mask.mean()
    rows = np.nonzero(mask)[0]
    centroid_depth = (rows.mean() + 0.5) / mask.shape[0]  # 0.5 for symmetric shapes, 2/3 for a triangle
    if fill < TRIANGLE_MAX_FILL or centroid_depth >= TRIANGLE_MIN_CENTROID_DEPTH:
        return "triangle"
    return "square" if fill >= SQUARE_MIN_FILL else "circle"


def _grid_cell(x: float, y: float, height: int, width: int) -> tuple[int, int]:
    row = min(int(y * shapes.GRID / height), shapes.GRID - 1)
    col = min(int(x * shapes.GRID / width), shapes.GRID - 1)
    return row, col


def _component_detection(
    mask: np.ndarray, offset: tuple[int, int], colour: str, image_shape: tuple[int, int]
) -> Detection:
    """One component (bool [h, w], its bbox crop at ``offset = (y0, x0)``) -> Detection."""
    # Noise can knock single pixels out of an object; holes would lower the fill ratio.
    mask = ndimage.binary_fill_holes(mask)
    ys, xs = np.nonzero(mask)
    y0, x0 = offset
    cx, cy = float(xs.mean() + x0 + 0.5), float(ys.mean() + y0 + 0.5)
    height, width = mask.shape
    return Detection(
        shape=classify_shape(mask),
        colour=colour,
        centroid=(cx, cy),
        bbox=(x0, y0, x0 + width, y0 + height),
        cell=_grid_cell(cx, cy, *image_shape),
        area=int(mask.sum()),
        fill_ratio=float(mask.mean()),
    )


def _components(mask: np.ndarray, offset: tuple[int, int] = (0, 0)):
    """bool [h, w] -> yields its 4-connected components as (bool crop, (y0, x0) in the image) pairs;
    ``offset`` is where ``mask`` itself sits in the image."""
    labelled, _ = ndimage.label(mask)
    for index, box in enumerate(ndimage.find_objects(labelled), start=1):
        yield labelled[box] == index, (box[0].start + offset[0], box[1].start + offset[1])


def _split_oversized(mask: np.ndarray, offset: tuple[int, int], image_shape: tuple[int, int]) -> list:
    """A component taller or wider than a grid cell -> its parts in each cell, as (crop, offset) pairs.

    The dataset draws objects at most 0.85 cell wide, each inside its own cell, but two of one colour
    in neighbouring cells can touch (or be blurred together) across the cell line, and 4-connectivity
    then merges them: 0.14% of clean 64 px scenes, 0.5% of counting scenes, whose objects share a
    colour. A component no single object can fill is therefore cut along the grid lines.
    """
    height, width = image_shape
    if mask.shape[0] <= height / shapes.GRID and mask.shape[1] <= width / shapes.GRID:
        return [(mask, offset)]
    y0, x0 = offset
    # Each pixel's cell by its centre, as _grid_cell places centroids.
    rows = np.minimum((np.arange(mask.shape[0]) + y0 + 0.5) * shapes.GRID // height, shapes.GRID - 1)
    cols = np.minimum((np.arange(mask.shape[1]) + x0 + 0.5) * shapes.GRID // width, shapes.GRID - 1)
    cell_ids = rows[:, None] * shapes.GRID + cols[None, :]
    return [part for cell_id in np.unique(cell_ids[mask]) for part in _components(mask & (cell_ids == cell_id), offset)]


def detect(image: np.ndarray, min_area_fraction: float = MIN_AREA_FRACTION) -> list[Detection]:
    """Finds the objects in a shapes-world image.

    Pixels are classified to the nearest palette colour (:func:`classify_pixels`); each colour's
    4-connected components (cut at grid lines when larger than a cell, see :func:`_split_oversized`) of
    at least ``min_area_fraction`` of the image become objects, whose shape comes from their geometry
    (:func:`classify_shape`).

    Args:
      image: uint8 [H, W, 3].
      min_area_fraction: smaller components are dropped as noise.
    Returns:
      Detections sorted by the (row, col) of their cell, then by centroid.
    """
    labels = classify_pixels(image)
    image_shape = labels.shape
    min_area = min_area_fraction * labels.size
    detections = []
    for colour_index, colour in enumerate(COLOUR_NAMES):
        for component in _components(labels == colour_index):
            for mask, offset in _split_oversized(*component, image_shape):
                if mask.sum() >= min_area:
                    detections.append(_component_detection(mask, offset, colour, image_shape))
    return sorted(detections, key=lambda det: (det.cell, det.centroid))


# ----------------------------------------------------------------------------------------------- scoring


def _count(detections: Sequence[Detection], shape: str, colour: str | None = None) -> int:
    return sum(det.shape == shape and (colour is None or det.colour == colour) for det in detections)


def _relation_holds(detections: Sequence[Detection], prompt: EvalPrompt) -> bool:
    first, second = prompt.objects
    return any(
        shapes.relation(a, b) == prompt.relation
        for a in detections
        if a.shape == first.shape
        for b in detections
        if b.shape == second.shape and a.cell != b.cell  # one cell has no relation to itself
    )


_RULES: dict[str, Callable[[EvalPrompt, Sequence[Detection]], bool]] = {
    "single_object": lambda p, d: _count(d, p.objects[0].shape) >= 1,
    "two_object": lambda p, d: all(_count(d, obj.shape) >= 1 for obj in p.objects),
    "counting": lambda p, d: _count(d, p.objects[0].shape) == p.objects[0].count,
    "colours": lambda p, d: _count(d, p.objects[0].shape, p.objects[0].colour) >= 1,
    "position": lambda p, d: _relation_holds(d, p),
    "colour_attr": lambda p, d: all(_count(d, obj.shape, obj.colour) >= 1 for obj in p.objects),
}


def score_detections(prompt: EvalPrompt, detections: Sequence[Detection]) -> bool:
    """Whether ``detections`` satisfy ``prompt`` under its category's rule (see the module docstring)."""
    if prompt.category not in _RULES:
        raise ValueError(f"prompt.category must be one of {CATEGORIES}, got {prompt.category!r}")
    return bool(_RULES[prompt.category](prompt, detections))


def score(prompt: EvalPrompt, image: np.ndarray) -> bool:
    """Whether ``image`` (uint8 [H, W, 3]) satisfies ``prompt``."""
    return score_detections(prompt, detect(image))


def evaluate(prompts: Sequence[EvalPrompt], images: Sequence[np.ndarray] | np.ndarray) -> dict:
    """Scores ``images[i]`` (uint8 [H, W, 3], or one [N, H, W, 3] array) against ``prompts[i]``.

    Returns:
      ``{"categories": {category: {"correct", "total", "accuracy"}}, "overall": float, "correct": int,
      "total": int}``. ``overall`` is the mean of the per-category accuracies (GenEval's overall score),
      over the categories that have prompts; categories appear in :data:`CATEGORIES` order.
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images; expected one image per prompt")
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    unknown = {prompt.category for prompt in prompts} - set(CATEGORIES)
    if unknown:
        raise ValueError(f"prompt categories {sorted(unknown)} are not among {CATEGORIES}")
    correct = dict.fromkeys(CATEGORIES, 0)
    total = dict.fromkeys(CATEGORIES, 0)
    for prompt, image in zip(prompts, images):
        correct[prompt.category] += score(prompt, image)
        total[prompt.category] += 1
    categories = {
        name: dict(correct=correct[name], total=total[name], accuracy=correct[name] / total[name])
        for name in CATEGORIES
        if total[name]
    }
    return dict(
        categories=categories,
        overall=float(np.mean([row["accuracy"] for row in categories.values()])),
        correct=sum(correct.values()),
        total=sum(total.values()),
    )


def format_table(results: dict) -> str:
    """The result of :func:`evaluate` as a markdown table, one row per category and an overall row."""
    lines = ["| category | correct | total | accuracy |", "|---|---:|---:|---:|"]
    for name, row in results["categories"].items():
        lines.append(f"| {name} | {row['correct']} | {row['total']} | {100 * row['accuracy']:.1f}% |")
    lines.append(
        f"| **overall** (mean of categories) | {results['correct']} | {results['total']} | "
        f"{100 * results['overall']:.1f}% |"
    )
    return "\n".join(lines)
