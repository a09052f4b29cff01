"""Procedural labelled images: the embedded default dataset's generator.

A class is a (shape, colour) pair: 5 shapes x 3 colours = 15 classes, label
`shape_idx * len(COLOURS) + colour_idx`. Nuisance factors vary per image so
that a useful representation has to ignore them: colour jitter, scale,
position, rotation, background tint, pixel noise, line clutter, small
distractor blobs in non-class colours (so the class colour stays unambiguous),
and the image side (32..64 px).

Every image is a pure function of (seed, index), so a split can be regenerated
anywhere bit-identically and two seeds give disjoint (held-out) splits.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

# Bump when the rendering changes, so cached datasets are regenerated.
GENERATOR_VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue")
CLASS_NAMES: list[str] = [f"{colour}_{shape}" for shape in SHAPES for colour in COLOURS]

MIN_SIDE = 32
MAX_SIDE = 64

_CLASS_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 190, 40),
    "blue": (40, 60, 220),
}
# Distractors avoid the class colours: a blob must never change the answer.
_DISTRACTOR_RGB: tuple[tuple[int, int, int], ...] = (
    (230, 220, 40),  # yellow
    (40, 215, 215),  # cyan
    (215, 45, 215),  # magenta
    (245, 245, 245),  # white
    (15, 15, 15),  # black
)


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` inscribed in a circle of `radius`, rotated by `angle` rad."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        # 10 vertices alternating outer and inner radius (inner/outer = 0.45).
        pts = [
            ((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
            for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))
        ]
    elif shape == "cross":
        w = 0.32  # arm half-width relative to the arm length
        # Outline of the top arm up to the inner corner, repeated at 90-degree turns.
        arm = [(w, 1.0), (-w, 1.0), (-w, w)]
        pts = []
        for _ in range(4):
            pts += arm
            arm = [(-y, x) for x, y in arm]
    else:
        raise ValueError(f"no polygon for shape {shape!r}; valid: square, triangle, star, cross")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in pts]


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, spread: int) -> tuple[int, int, int]:
    """Brightness scaling plus per-channel offsets, clipped to 0..255."""
    # Plain floats: numpy's per-call overhead dominates on 3-element arrays.
    scale = float(rng.uniform(0.8, 1.1))
    offsets = rng.integers(-spread, spread + 1, 3).tolist()
    r, g, b = (min(255, max(0, int(c * scale + o))) for c, o in zip(rgb, offsets, strict=True))
    return (r, g, b)


def _desaturated(rng: np.random.Generator, low: int, high: int) -> tuple[int, int, int]:
    """A random colour pulled 85% toward its grey, so it never reads as a class colour."""
    rgb = rng.integers(low, high, 3).tolist()
    grey = sum(rgb) / 3
    r, g, b = (int(0.15 * c + 0.85 * grey) for c in rgb)
    return (r, g, b)


def render_sample(index: int, seed: int) -> tuple[Image.Image, int]:
    """Render image `index` of the split `seed`: an RGB PIL image and its class label."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASS_NAMES)))
    shape, colour = SHAPES[label // len(COLOURS)], COLOURS[label % len(COLOURS)]
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))

    # Background: tinted grey plus per-pixel Gaussian noise of random strength.
    noise = rng.standard_normal((side, side, 3), dtype=np.float32) * rng.uniform(0.0, 12.0)  # (H, W, 3)
    background = noise + np.asarray(_desaturated(rng, 40, 220), dtype=np.float32)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)

    for _ in range(int(rng.integers(0, 5))):
        x0, y0, x1, y1 = rng.uniform(0, side, 4).tolist()
        draw.line([(x0, y0), (x1, y1)], fill=_desaturated(rng, 0, 256), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 4))):
        r = rng.uniform(1.0, side / 12)
        x, y = rng.uniform(0, side, 2).tolist()
        fill = _DISTRACTOR_RGB[int(rng.integers(len(_DISTRACTOR_RGB)))]
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(fill, rng, 15))

    # The object: radius 15%..35% of the side, fully inside the image.
    radius = side * rng.uniform(0.15, 0.35)
    cx, cy = rng.uniform(radius, side - radius, 2).tolist()
    fill = _jitter(_CLASS_RGB[colour], rng, 20)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, rng.uniform(0, 2 * math.pi)), fill=fill)
    return image, label
