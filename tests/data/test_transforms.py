"""ADM random-resized crop, centre crop, flip and normalisation."""
import math

import numpy as np
import pytest
from PIL import Image

from tokenflow_jax.data import images, transforms


def adm_reference(pil_image, image_size, smaller_dim_size, draw_offset):
    """guided-diffusion's ``random_crop_arr`` with its two random draws made explicit."""
    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = smaller_dim_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = int(draw_offset(arr.shape[0] - image_size + 1))
    crop_x = int(draw_offset(arr.shape[1] - image_size + 1))
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("wh", [(700, 500), (64, 300), (40, 33), (10, 10), (257, 256)])
def test_matches_the_reference(wh, rng):
    size = 64
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    for seed in range(4):
        ours = transforms.adm_random_resized_crop(img, size, np.random.default_rng(seed))
        replay = np.random.default_rng(seed)  # the same draws, in the documented order
        target = int(replay.integers(size, math.ceil(size / 0.8) + 1))
        ref = adm_reference(img, size, target, replay.integers)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, ref)


def test_crop_statistics():
    # A horizontal ramp: the span of values in a crop measures which fraction of the image it covers.
    size, width = 32, 400
    ramp = np.broadcast_to(np.linspace(0, 255, width)[None, :, None], (width, width, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(ramp))
    fractions, lefts = [], []
    for seed in range(300):
        out = transforms.normalize(transforms.adm_random_resized_crop(img, size, np.random.default_rng(seed)))
        assert out.shape == (size, size, 3) and out.dtype == np.float32
        assert -1.0 <= out.min() and out.max() <= 1.0
        row = (out[size // 2, :, 0] + 1) / 2
        fractions.append(row[-1] - row[0])
        lefts.append(row[0])
    fractions = np.array(fractions)
    # The short side goes to [32, 40] px, so a crop covers 32/40 = 0.8 to 1.0 of the width (+/- filter blur).
    assert fractions.min() > 0.75 and fractions.max() < 1.0
    assert fractions.min() < 0.81 and fractions.max() > 0.95
    assert min(lefts) < 0.02 and max(lefts) > 0.15  # offsets reach both ends (0 and 8/40)


def test_small_image_is_upscaled_and_constant_stays_constant():
    img = Image.new("RGB", (10, 7), (10, 120, 250))
    out = transforms.adm_random_resized_crop(img, 32, np.random.default_rng(0))
    assert out.shape == (32, 32, 3)
    assert (out == (10, 120, 250)).all()


def test_center_crop_is_images_center_crop(rng):
    img = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    np.testing.assert_array_equal(transforms.center_crop(img, 32), images.center_crop(img, 32))


def test_random_flip():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    outcomes = [transforms.random_flip(arr, np.random.default_rng(s)) for s in range(200)]
    flipped = sum(np.array_equal(o, arr[:, ::-1]) for o in outcomes)
    kept = sum(np.array_equal(o, arr) for o in outcomes)
    assert flipped + kept == 200 and 70 < flipped < 130


def test_normalize():
    out = transforms.normalize(np.array([[[0, 128, 255]]], np.uint8))
    np.testing.assert_allclose(out, [[[-1.0, 128 / 127.5 - 1, 1.0]]], atol=1e-6)
    assert out.dtype == np.float32
