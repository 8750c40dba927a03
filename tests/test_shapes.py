"""ditmesh.shapes: the captioned pictures the project's own model is trained on."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from ditmesh import shapes
from ditmesh.shapes import (
    COLOURS,
    HELD_OUT,
    KINDS,
    PLACES,
    SIZES,
    VOCAB,
    Scene,
    Shape,
    batch,
    caption,
    parse_caption,
    random_scene,
    render,
    tokenize,
    training_scene,
)


def test_the_example_caption_of_the_issue():
    scene = Scene(
        (Shape("square", "blue", "large", "right"), Shape("circle", "red", "small", "left")),
        "white",
    )
    assert caption(scene) == (
        "a small red circle on the left and a large blue square on the right, on a white background"
    )
    three = Scene(
        (
            Shape("triangle", "green", "small", "centre"),
            Shape("circle", "red", "small", "top"),
            Shape("square", "blue", "large", "left"),
        ),
        "orange",
    )
    assert caption(three) == (
        "a large blue square on the left, a small red circle at the top and "
        "a small green triangle in the centre, on an orange background"
    )


def test_caption_and_parse_caption_are_inverse():
    rng = random.Random(0)
    for _ in range(3000):
        scene = random_scene(rng)
        text = caption(scene)
        assert parse_caption(text) == scene
        assert caption(parse_caption(text)) == text
        assert set(tokenize(text)) <= set(VOCAB)
        # The trainer's text encoders take 64 tokens; the longest caption is far shorter.
        assert len(tokenize(text)) <= 32


def test_a_scene_has_one_caption_whatever_the_order_of_its_shapes():
    a = Shape("circle", "red", "small", "bottom")
    b = Shape("square", "blue", "large", "top")
    assert Scene((a, b), "white") == Scene((b, a), "white")
    assert caption(Scene((a, b), "white")) == caption(Scene((b, a), "white"))


@pytest.mark.parametrize(
    "text, words",
    [
        ("a small red hexagon on the left, on a white background", "hexagon"),
        ("a huge red circle on the left, on a white background", "huge"),
        ("a small red circle on the left, on a teal background", "teal"),
    ],
)
def test_parse_caption_names_the_words_it_does_not_know(text, words):
    with pytest.raises(ValueError, match=f"unknown words.*{words}"):
        parse_caption(text)


@pytest.mark.parametrize(
    "text",
    [
        "a small red circle on the left",
        "a red small circle on the left, on a white background",
        "a small red circle the left, on a white background",
        "a small red circle on the left, on an white background",
        "a small red circle on the left, on a left background",
        "a small red circle on the left and a small red circle on the left, on a white background",
        "a small red circle on the left, on a red background",
    ],
)
def test_parse_caption_refuses_what_caption_does_not_write(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_scenes_are_checked():
    with pytest.raises(ValueError, match="1 to 3"):
        Scene((), "white")
    with pytest.raises(ValueError, match="unknown kind"):
        Shape("hexagon", "red", "small", "left")
    with pytest.raises(ValueError, match="invisible"):
        Scene((Shape("circle", "red", "small", "left"),), "red")


def test_random_scenes_cover_every_attribute():
    rng = random.Random(1)
    scenes = [random_scene(rng) for _ in range(2000)]
    shapes_ = [s for scene in scenes for s in scene.shapes]
    assert {s.kind for s in shapes_} == set(KINDS)
    assert {s.colour for s in shapes_} == set(COLOURS)
    assert {s.size for s in shapes_} == set(SIZES)
    assert {s.place for s in shapes_} == set(PLACES)
    assert {scene.background for scene in scenes} == set(COLOURS)
    assert {len(scene.shapes) for scene in scenes} == {1, 2, 3}


def test_held_out_is_fixed_and_mixed():
    assert len(HELD_OUT) == len(set(HELD_OUT)) == 50
    counts = [len(parse_caption(text).shapes) for text in HELD_OUT]
    assert (counts.count(1), counts.count(2), counts.count(3)) == (14, 18, 18)
    # Pinned: a change of HELD_OUT (or of random_scene's draws) changes what every trained
    # model was held out from.
    digest = hashlib.sha256("\n".join(HELD_OUT).encode()).hexdigest()
    assert digest == HELD_OUT_DIGEST


HELD_OUT_DIGEST = "e12000cdad6fb666f0c18cc76692b330594979c01706736b4c966d41f75edcbf"


def test_training_never_draws_a_held_out_caption():
    held = set(HELD_OUT)
    rng = random.Random(2)
    drawn = {caption(training_scene(rng)) for _ in range(20_000)}
    assert not drawn & held
    # ... while random_scene does draw them: the filter is what keeps them out.
    rng = random.Random(2)
    single = {caption(random_scene(rng, 1)) for _ in range(20_000)}
    assert single & held


def test_render_is_deterministic_and_batch_too():
    scene = parse_caption(HELD_OUT[-1])
    assert render(scene).tobytes() == render(scene).tobytes()
    assert render(scene, rng=random.Random(5)).tobytes() == (
        render(scene, rng=random.Random(5)).tobytes()
    )
    a_images, a_captions = batch(random.Random(3), 6, 64)
    b_images, b_captions = batch(random.Random(3), 6, 64)
    assert a_images.dtype == np.uint8 and a_images.shape == (6, 64, 64, 3)
    assert a_images.tobytes() == b_images.tobytes() and a_captions == b_captions
    c_images, _ = batch(random.Random(4), 6, 64)
    assert c_images.tobytes() != a_images.tobytes()


def test_render_draws_the_background_and_the_shapes_in_their_colours():
    scene = parse_caption(
        "a large red square on the left and a small blue circle at the top, on a white background"
    )
    image = render(scene, 128)
    assert tuple(image[0, 0]) == tuple(image[-1, -1]) == COLOURS["white"]
    # Middle of the left cell, middle of the top cell.
    assert tuple(image[64, 21]) == COLOURS["red"]
    assert tuple(image[21, 64]) == COLOURS["blue"]
    assert tuple(image[64, 64]) == COLOURS["white"]
    # Anti-aliased: edge pixels are blends, not only the three colours.
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 3


def test_the_dataset_iterator_matches_its_seed():
    first = list(shapes.dataset(7, 3, 32))
    again = list(shapes.dataset(7, 3, 32))
    assert [c for _, c in first] == [c for _, c in again]
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(first, again, strict=True))
