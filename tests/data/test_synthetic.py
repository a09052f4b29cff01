"""The procedural default dataset: determinism, class balance, nuisance ranges, label meaning."""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import ImageFilter

from data.synthetic import CLASS_NAMES, COLOURS, MAX_SIDE, MIN_SIDE, SHAPES, render_sample


def test_same_seed_and_index_give_identical_pixels() -> None:
    for index in (0, 7, 12345):
        a, label_a = render_sample(index, seed=4)
        b, label_b = render_sample(index, seed=4)
        assert label_a == label_b and a.size == b.size
        assert np.array_equal(np.asarray(a), np.asarray(b))
    other = [np.asarray(render_sample(i, seed=5)[0]) for i in (0, 7)]
    assert not np.array_equal(np.asarray(render_sample(0, seed=4)[0]), other[0])
    assert not np.array_equal(other[0], other[1]) if other[0].shape == other[1].shape else True


def test_labels_cover_all_classes_roughly_uniformly() -> None:
    assert len(CLASS_NAMES) == len(SHAPES) * len(COLOURS) == 15
    draws = 1500
    counts = Counter(render_sample(i, seed=0)[1] for i in range(draws))
    assert set(counts) == set(range(15))
    # Binomial(1500, 1/15): mean 100, sd ~9.7; +-40 is about 4 sd.
    assert all(60 <= counts[c] <= 140 for c in range(15)), counts


def test_images_are_rgb_with_sides_in_range() -> None:
    sizes = set()
    for i in range(300):
        image, _ = render_sample(i, seed=1)
        assert image.mode == "RGB" and image.width == image.height
        sizes.add(image.width)
    assert min(sizes) >= MIN_SIDE and max(sizes) <= MAX_SIDE
    assert len(sizes) > 20  # the side really varies


def test_colour_of_the_label_is_the_dominant_saturated_colour() -> None:
    """Independent reading of the label: count strongly red/green/blue pixels after denoising."""
    assert CLASS_NAMES[SHAPES.index("star") * len(COLOURS) + COLOURS.index("blue")] == "blue_star"
    agree = 0
    for i in range(200):
        image, label = render_sample(i, seed=2)
        rgb = np.asarray(image.filter(ImageFilter.MedianFilter(3)), dtype=np.int32)  # (H, W, 3)
        votes = []
        for c in range(3):
            others = np.delete(rgb, c, axis=2).max(axis=2)
            votes.append(int(((rgb[..., c] - others) > 60).sum()))
        agree += COLOURS[int(np.argmax(votes))] == CLASS_NAMES[label].split("_")[0]
    assert agree >= 196, agree
