"""Captioned pictures of coloured shapes, drawn on the fly from a seed (issue 19).

The training data and the prompts of ditmesh's own small text-to-image model: one to three
circles, squares or triangles in named colours, two sizes and five places on a plain
background, with the one caption that says what the picture shows:

    a small red circle on the left and a large blue square on the right, on a white background

A `Scene` is the meaning, `caption` / `parse_caption` turn it into words and back (one
wording per scene: a scene keeps its shapes in the order of `PLACES`), `render` draws it
with anti-aliased edges, and `HELD_OUT` is a fixed set of captions that `training_scene`
never draws, so the model is judged on prompts it has not seen.

Left to others: the model and its training (tools/train_shapes.py, which tokenizes with
`tokenize` over `VOCAB`), and judging a generated picture against its prompt (ditmesh.eval,
which reads the geometry constants here: where each place is, how big each size is).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Far apart in RGB (the closest pair, orange and yellow, is ~80 apart), so the nearest
# named colour of a pixel survives noise and blur. Every colour can be a background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "white": (240, 240, 240),
}
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
PLACES = ("left", "right", "top", "bottom", "centre")

# Where each place is, as fractions (x, y) of the side: the middle of a cell of a 3x3 grid.
PLACE_CENTRES: dict[str, tuple[float, float]] = {
    "left": (1 / 6, 1 / 2),
    "right": (5 / 6, 1 / 2),
    "top": (1 / 2, 1 / 6),
    "bottom": (1 / 2, 5 / 6),
    "centre": (1 / 2, 1 / 2),
}
# A shape's side (circle: diameter; triangle: base and height) as a fraction of the image.
SIDES = {"small": 0.14, "large": 0.26}
# Training jitter, at most: the centre moves by this fraction of the image side, the side
# scales by 1 +- SIDE_JITTER. Two large shapes in neighbouring cells stay >= 3 px apart at
# 128 px, and the centroid stays well inside its third.
CENTRE_JITTER = 0.02
SIDE_JITTER = 0.05

_PLACE_WORDS = {
    "left": ("on", "the", "left"),
    "right": ("on", "the", "right"),
    "top": ("at", "the", "top"),
    "bottom": ("at", "the", "bottom"),
    "centre": ("in", "the", "centre"),
}
_WORDS_PLACE = {words: place for place, words in _PLACE_WORDS.items()}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    place: str

    def __post_init__(self):
        for value, allowed, what in (
            (self.kind, KINDS, "kind"),
            (self.colour, COLOURS, "colour"),
            (self.size, SIZES, "size"),
            (self.place, PLACES, "place"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}: expected one of {sorted(allowed)}")


@dataclass(frozen=True)
class Scene:
    """One to three shapes in distinct places on a plain background; the shapes are kept
    in the order of PLACES, so a scene has one caption however it was built."""

    shapes: tuple[Shape, ...]
    background: str

    def __post_init__(self):
        if self.background not in COLOURS:
            raise ValueError(
                f"unknown background {self.background!r}: expected one of {sorted(COLOURS)}"
            )
        if not 1 <= len(self.shapes) <= 3:
            raise ValueError(f"a scene has 1 to 3 shapes, not {len(self.shapes)}")
        places = [s.place for s in self.shapes]
        if len(set(places)) != len(places):
            raise ValueError(f"two shapes in one place: {places}")
        for s in self.shapes:
            if s.colour == self.background:
                raise ValueError(f"a {s.colour} {s.kind} on a {s.colour} background is invisible")
        ordered = tuple(sorted(self.shapes, key=lambda s: PLACES.index(s.place)))
        object.__setattr__(self, "shapes", ordered)


def random_scene(rng: random.Random, n_shapes: int | None = None) -> Scene:
    """A uniformly drawn scene (1-3 shapes unless `n_shapes` says). The sequence of draws is
    part of the data: HELD_OUT and every trained model depend on it, so keep it as is."""
    n = rng.randint(1, 3) if n_shapes is None else n_shapes
    background = rng.choice(list(COLOURS))
    colours = [c for c in COLOURS if c != background]
    places = rng.sample(PLACES, n)
    shapes = tuple(
        Shape(rng.choice(KINDS), rng.choice(colours), rng.choice(SIZES), place) for place in places
    )
    return Scene(shapes, background)


def caption(scene: Scene) -> str:
    phrases = [
        " ".join(("a", s.size, s.colour, s.kind, *_PLACE_WORDS[s.place])) for s in scene.shapes
    ]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed}, on {_article(scene.background)} {scene.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def tokenize(text: str) -> list[str]:
    """The words of a caption, the comma one word of its own (as in VOCAB)."""
    return text.lower().replace(",", " , ").split()


VOCAB: list[str] = sorted(
    {"a", "an", "and", ",", "on", "background", *COLOURS, *KINDS, *SIZES}
    | {w for words in _PLACE_WORDS.values() for w in words}
)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes: the inverse of `caption`. Raises ValueError on words
    outside VOCAB and on word orders that `caption` does not write."""
    words = tokenize(text)
    unknown = sorted({w for w in words if w not in VOCAB})
    if unknown:
        raise ValueError(f"unknown words {unknown} in {text!r}; the vocabulary is {VOCAB}")
    tail = words[-5:]
    if len(words) < 5 or tail[:3] != [",", "on", _article(tail[3])] or tail[4] != "background":
        raise ValueError(f"{text!r} does not end with ', on a(n) <colour> background'")
    if tail[3] not in COLOURS:
        raise ValueError(f"{tail[3]!r} in {text!r} is not a background colour")
    phrases: list[list[str]] = [[]]
    for w in words[:-5]:
        if w in (",", "and"):
            phrases.append([])
        else:
            phrases[-1].append(w)
    shapes = []
    for p in phrases:
        if len(p) != 7 or p[0] != "a" or tuple(p[4:]) not in _WORDS_PLACE:
            raise ValueError(
                f"{' '.join(p)!r} in {text!r} is not 'a <size> <colour> <kind> <place>'"
            )
        size, colour, kind = p[1:4]
        if size not in SIZES or colour not in COLOURS or kind not in KINDS:
            raise ValueError(f"{' '.join(p)!r} in {text!r} is not 'a <size> <colour> <kind> ...'")
        shapes.append(Shape(kind, colour, size, _WORDS_PLACE[tuple(p[4:])]))
    return Scene(tuple(shapes), tail[3])


def _held_out() -> tuple[str, ...]:
    # Seeded with the issue number and pinned by a digest in tests/test_shapes.py: changing
    # this set changes what "held out" means for every trained model.
    rng = random.Random(19)
    out: list[str] = []
    for n_shapes, count in ((1, 14), (2, 18), (3, 18)):
        chosen: list[str] = []
        while len(chosen) < count:
            text = caption(random_scene(rng, n_shapes))
            if text not in chosen:
                chosen.append(text)
        out += chosen
    return tuple(out)


HELD_OUT: tuple[str, ...] = _held_out()
_HELD_OUT_SET = frozenset(HELD_OUT)


def training_scene(rng: random.Random) -> Scene:
    """A random scene whose caption is not in HELD_OUT."""
    while True:
        scene = random_scene(rng)
        if caption(scene) not in _HELD_OUT_SET:
            return scene


def _signed_distance(kind: str, x: np.ndarray, y: np.ndarray, half: float) -> np.ndarray:
    """Distance in pixels from the shape's edge, negative inside (exact near the edges,
    which is all the anti-aliasing needs); x, y are offsets from the shape's centre."""
    if kind == "circle":
        return np.sqrt(x * x + y * y) - half
    if kind == "square":
        return np.maximum(np.abs(x), np.abs(y)) - half
    # Apex up at (0, -half), base along y = +half: the two slanted edges have normals
    # (-+2, -1)/sqrt(5).
    slant = (2 * np.abs(x) - (y + half)) * np.float32(1 / np.sqrt(5.0))
    return np.maximum(y - half, slant)


def render(scene: Scene, size: int = 128, rng: random.Random | None = None) -> np.ndarray:
    """The scene as uint8 RGB [size, size, 3]. With `rng`, each shape's centre and side
    are jittered a little (CENTRE_JITTER, SIDE_JITTER) for training variety."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = COLOURS[scene.background]
    for shape in scene.shapes:
        fx, fy = PLACE_CENTRES[shape.place]
        side = SIDES[shape.size] * size
        if rng is not None:
            fx += rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
            fy += rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
            side *= 1 + rng.uniform(-SIDE_JITTER, SIDE_JITTER)
        cx, cy, half = fx * size, fy * size, side / 2
        x0, y0 = max(int(cx - half) - 2, 0), max(int(cy - half) - 2, 0)
        x1, y1 = min(int(cx + half) + 3, size), min(int(cy + half) + 3, size)
        # Pixel centres sit at i + 0.5; coverage ramps over one pixel across the edge.
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] + np.float32(0.5 - cx)
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] + np.float32(0.5 - cy)
        d = _signed_distance(shape.kind, xs, ys, np.float32(half))
        alpha = np.clip(np.float32(0.5) - d, 0.0, 1.0)[..., None]
        # Only the shape's window is blended (in float), the rest stays uint8: 2x faster.
        window = image[y0:y1, x0:x1].astype(np.float32)
        window += alpha * (np.asarray(COLOURS[shape.colour], np.float32) - window)
        image[y0:y1, x0:x1] = np.rint(window)
    return image


def batch(rng: random.Random, n: int, size: int = 128) -> tuple[np.ndarray, list[str]]:
    """n jittered training pictures (uint8 [n, size, size, 3]) and their captions:
    ~5000 pictures/s at 128 px on one CPU core, so a data-loader worker or two keep a GPU
    fed."""
    images = np.empty((n, size, size, 3), np.uint8)
    captions = []
    for i in range(n):
        scene = training_scene(rng)
        images[i] = render(scene, size, rng)
        captions.append(caption(scene))
    return images, captions


def dataset(seed: int, n: int | None = None, size: int = 128) -> Iterator[tuple[np.ndarray, str]]:
    """(picture, caption) pairs of training scenes from `seed`; endless when n is None."""
    rng = random.Random(seed)
    i = 0
    while n is None or i < n:
        scene = training_scene(rng)
        yield render(scene, size, rng), caption(scene)
        i += 1
