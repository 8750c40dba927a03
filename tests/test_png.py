"""The VAE stage's PNG encoder: every pixel comes back through an ordinary decoder (Pillow)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ditmesh.vae.png import encode_png


def decode(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()  # checks the CRCs and the Adler-32 as it inflates
    return np.asarray(img)


@pytest.mark.parametrize(
    "shape", [(1, 1, 3), (7, 5, 3), (64, 96, 3), (333, 517, 3), (1024, 1024, 3), (40, 30, 4)]
)
@pytest.mark.parametrize("stripes", [0, 1, 3, 8])
def test_round_trip_is_exact(shape, stripes):
    rng = np.random.default_rng(sum(shape) + stripes)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(decode(encode_png(pixels, stripes=stripes)), pixels)


def test_grey_and_smooth_images_round_trip_and_compress():
    y, x = np.mgrid[0:512, 0:512]
    smooth = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    data = encode_png(smooth, stripes=4)
    assert np.array_equal(decode(data), smooth)
    assert len(data) < smooth.nbytes / 20  # the Up filter and deflate find the gradients
    grey = smooth[:, :, 0]
    assert np.array_equal(decode(encode_png(grey)), grey)


def test_more_stripes_than_rows():
    pixels = np.arange(2 * 9 * 3, dtype=np.uint8).reshape(2, 9, 3)
    assert np.array_equal(decode(encode_png(pixels, stripes=16)), pixels)


@pytest.mark.parametrize(
    "pixels, match",
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "uint8"),
        (np.zeros((4, 4, 2), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((0, 4, 3), dtype=np.uint8), r"\[H, W, 3\]"),
    ],
)
def test_bad_input_is_refused(pixels, match):
    with pytest.raises(ValueError, match=match):
        encode_png(pixels)
