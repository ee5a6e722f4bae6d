"""The built-in procedural dataset: coloured circles, squares and triangles on a plain background.

A scene holds 1-4 objects, each in its own cell of a 3x3 grid (so objects never overlap and counting is
unambiguous), each a named palette colour. Everything is a pure function of a ``np.random.Generator``:

    scene = sample_scene(rng)            # list[ShapeObject], positions as fractions of the image
    image = render(scene, size)          # uint8 [size, size, 3], no antialiasing (bit-exact everywhere)
    text = caption(scene)                # "two red circles and a blue square" /
                                         # "a red circle on the left of a green triangle" (2 objects)
    meta = metadata(scene, size)         # shape, colour, grid cell, pixel bbox per object

The metadata is what a VQA generator and a GenEval-style analytic scorer (counting, colours, positions)
read; the palette is far apart in RGB so a scorer can classify colours by nearest palette entry.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Far apart in RGB and from the background, so nearest-colour classification is reliable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 180, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Mid grey maps to ~0 in the model's [-1, 1] range.
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
GRID = 3
MAX_OBJECTS = 4
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "centre", "right")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
# Probability that every object of a scene shares one shape and colour: independent draws alone would
# almost never give "three blue squares", and counting is what the scorer tests.
P_UNIFORM = 0.35


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object. ``cx, cy`` (centre) and ``half`` (half the side) are fractions of the image side."""

    shape: str
    colour: str
    row: int
    col: int
    cx: float
    cy: float
    half: float

    def bbox(self, size: int) -> tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)``, half-open: the object covers ``[x0, x1) x [y0, y1)``."""
        x0, y0 = round((self.cx - self.half) * size), round((self.cy - self.half) * size)
        x1, y1 = round((self.cx + self.half) * size), round((self.cy + self.half) * size)
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def sample_scene(
    rng: np.random.Generator,
    *,
    max_objects: int = MAX_OBJECTS,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
) -> list[ShapeObject]:
    """1..max_objects objects in distinct grid cells, in the (random) order they will be mentioned."""
    if not 1 <= max_objects <= GRID * GRID:
        raise ValueError(f"max_objects must be in [1, {GRID * GRID}], got {max_objects}")
    count = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    uniform = rng.random() < P_UNIFORM
    shape_ids = np.full(count, rng.integers(len(shapes))) if uniform else rng.integers(len(shapes), size=count)
    colour_ids = np.full(count, rng.integers(len(colours))) if uniform else rng.integers(len(colours), size=count)
    cell_side = 1.0 / GRID
    objects = []
    for cell, shape_id, colour_id in zip(cells, shape_ids, colour_ids):
        row, col = divmod(int(cell), GRID)
        # Side 55-85% of a cell; jitter the centre only within the cell's free margin.
        half = 0.5 * cell_side * float(rng.uniform(0.55, 0.85))
        slack = 0.5 * cell_side - half
        cx = (col + 0.5) * cell_side + float(rng.uniform(-slack, slack))
        cy = (row + 0.5) * cell_side + float(rng.uniform(-slack, slack))
        objects.append(ShapeObject(shapes[int(shape_id)], colours[int(colour_id)], row, col, cx, cy, half))
    return objects


def render(
    objects: Sequence[ShapeObject], size: int, background: tuple[int, int, int] = BACKGROUND
) -> np.ndarray:
    """Draws a scene -> uint8 [size, size, 3]. No antialiasing: every pixel is the background or a palette
    colour, identical on every platform."""
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        fill = COLOURS[obj.colour]
        x0, y0, x1, y1 = obj.bbox(size)
        box = (x0, y0, x1 - 1, y1 - 1)  # PIL boxes are inclusive
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    return np.asarray(img)


def noun_phrase(count: int, colour: str, shape: str) -> str:
    """(2, 'red', 'circle') -> 'two red circles'; (1, 'red', 'circle') -> 'a red circle'."""
    if count == 1:
        return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"
    return f"{NUMBER_WORDS.get(count, str(count))} {colour} {shape}s"


def count_phrase(objects: Sequence[ShapeObject]) -> str:
    """Groups equal (colour, shape) objects in order of first mention: 'two red circles and a blue square'."""
    groups = Counter((obj.colour, obj.shape) for obj in objects)  # insertion-ordered
    parts = [noun_phrase(n, colour, shape) for (colour, shape), n in groups.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` is relative to ``b``: left/right when their columns differ, else above/below."""
    if a.col != b.col:
        return "on the left of" if a.col < b.col else "on the right of"
    return "above" if a.row < b.row else "below"


def caption(objects: Sequence[ShapeObject]) -> str:
    """The scene's canonical caption: a positional one for two objects, a counting one otherwise."""
    if len(objects) == 2:
        a, b = objects
        return f"{noun_phrase(1, a.colour, a.shape)} {relation(a, b)} {noun_phrase(1, b.colour, b.shape)}"
    return count_phrase(objects)


def metadata(objects: Sequence[ShapeObject], size: int) -> list[dict]:
    """Per object: shape, colour, grid cell (row, col), its names ('top', 'left'), pixel bbox (half-open)."""
    return [
        dict(
            shape=obj.shape,
            colour=obj.colour,
            cell=(obj.row, obj.col),
            position=(ROW_NAMES[obj.row], COL_NAMES[obj.col]),
            bbox=obj.bbox(size),
        )
        for obj in objects
    ]


def scene_rng(index: int, seed: int) -> np.random.Generator:
    """The generator for example ``index`` of the dataset with ``seed``: independent of every other index."""
    return np.random.default_rng([int(seed), int(index)])
