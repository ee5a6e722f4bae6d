"""The procedural shapes dataset: deterministic, and captions that agree with the metadata."""
import collections
import re
import time

import numpy as np

from tokenflow_jax.data.sources import ShapesSource
from tokenflow_jax.shapes import scenes as shapes

_WORD_COUNTS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
_PHRASE = re.compile(r"\b(a|an|two|three|four) (\w+) (circle|square|triangle)s?\b")


def _parse_counts(text):
    """'two red circles and a blue square' -> Counter({('red', 'circle'): 2, ('blue', 'square'): 1})."""
    counts = collections.Counter()
    for word, colour, shape in _PHRASE.findall(text):
        counts[(colour, shape)] += _WORD_COUNTS[word]
    return counts


def test_same_index_and_seed_give_the_same_example():
    a, b = ShapesSource(100, 64, seed=5), ShapesSource(100, 64, seed=5)
    for i in (0, 1, 57, 99):
        ra, rb = a[i], b[i]
        assert ra["image"].tobytes() == rb["image"].tobytes()
        assert ra["caption"] == rb["caption"] and ra["objects"] == rb["objects"]
    # Order of access does not matter: an example depends on (index, seed) only.
    assert a[7]["caption"] == ShapesSource(100, 64, seed=5)[7]["caption"]


def test_different_seeds_and_indices_differ():
    a, b = ShapesSource(50, 64, seed=0), ShapesSource(50, 64, seed=1)
    same_seed = sum(a[i]["image"].tobytes() == a[i + 1]["image"].tobytes() for i in range(49))
    other_seed = sum(a[i]["image"].tobytes() == b[i]["image"].tobytes() for i in range(50))
    assert same_seed == 0 and other_seed == 0


def test_caption_counts_and_colours_match_metadata():
    source = ShapesSource(400, 64, seed=0)
    numbers = collections.Counter()
    for i in range(len(source)):
        record = source[i]
        objects = record["objects"]
        assert 1 <= len(objects) <= 4 and record["label"] == len(objects)
        assert len({o["cell"] for o in objects}) == len(objects)  # one object per cell
        truth = collections.Counter((o["colour"], o["shape"]) for o in objects)
        assert _parse_counts(record["caption"]) == truth, (record["caption"], objects)
        numbers[len(objects)] += 1
        if len(objects) == 2:
            (ra, ca), (rb, cb) = objects[0]["cell"], objects[1]["cell"]
            relation = re.search(r"(on the left of|on the right of|above|below)", record["caption"]).group(1)
            expected = ("on the left of" if ca < cb else "on the right of") if ca != cb else (
                "above" if ra < rb else "below")
            assert relation == expected
    assert set(numbers) == {1, 2, 3, 4} and min(numbers.values()) > 50
    # The uniform-scene bias makes plural counting captions common.
    plural = sum(bool(re.search(r"\b(two|three|four) ", source[i]["caption"])) for i in range(100))
    assert plural > 15


def test_rendered_pixels_match_metadata():
    size = 64
    source = ShapesSource(100, size, seed=3)
    palette = {tuple(c) for c in shapes.COLOURS.values()} | {shapes.BACKGROUND}
    for i in range(len(source)):
        record = source[i]
        image = record["image"]
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert {tuple(p) for p in image.reshape(-1, 3)} <= palette  # no antialiasing: palette colours only
        painted = np.zeros((size, size), bool)
        for obj in record["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            # A point inside every shape: the centre (the triangle's is below the centre of its box).
            px, py = (x0 + x1 - 1) // 2, y0 + (7 * (y1 - y0)) // 10
            np.testing.assert_array_equal(image[py, px], shapes.COLOURS[obj["colour"]])
            row, col = obj["cell"]
            cell = size / shapes.GRID
            assert col * cell - 1 <= x0 and x1 <= (col + 1) * cell + 1
            assert row * cell - 1 <= y0 and y1 <= (row + 1) * cell + 1
            painted[y0:y1, x0:x1] = True
        assert (image[~painted] == shapes.BACKGROUND).all()  # nothing drawn outside the boxes


def test_caption_phrasing():
    obj = lambda shape, colour, row, col: shapes.ShapeObject(shape, colour, row, col, 0.5, 0.5, 0.1)
    assert shapes.caption([obj("circle", "red", 0, 0), obj("circle", "red", 1, 1), obj("square", "blue", 2, 2)]) == (
        "two red circles and a blue square")
    assert shapes.caption([obj("circle", "red", 1, 0), obj("triangle", "green", 1, 2)]) == (
        "a red circle on the left of a green triangle")
    assert shapes.caption([obj("square", "yellow", 2, 1), obj("square", "white", 0, 1)]) == (
        "a yellow square below a white square")
    assert shapes.noun_phrase(1, "orange", "circle") == "an orange circle"


def test_fast_enough():
    source = ShapesSource(10_000, 64, seed=0)
    start = time.perf_counter()
    for i in range(1000):
        source[i]
    rate = 1000 / (time.perf_counter() - start)
    assert rate > 1000, f"{rate:.0f} images/s"
