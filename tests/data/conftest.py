"""Small shard sets shared by the data tests."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.shards import manifest_url, write_shards
from data.synthetic import render_sample

SYN_SAMPLES = 120  # 7 shards of 16 + one of 8: readers get unequal counts
SYN_SHARD_SIZE = 16


@dataclass(frozen=True)
class ShardSet:
    root: Path
    manifest_url: str
    keys: list[str]  # in writing order
    shard_of: dict[str, int]  # key -> index of the shard it was written to


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    """120 procedural PNGs with labels, 8 shards."""
    root = tmp_path_factory.mktemp("syn")
    keys = [f"syn-{i:05d}" for i in range(SYN_SAMPLES)]

    def samples():
        for i, key in enumerate(keys):
            image, label = render_sample(i, seed=3)
            yield {"__key__": key, "png": png_bytes(image), "cls": label}

    write_shards(samples(), str(root), prefix="syn", shard_size=SYN_SHARD_SIZE)
    return ShardSet(root, manifest_url(str(root), "syn"), keys, {k: i // SYN_SHARD_SIZE for i, k in enumerate(keys)})


def solid_colour(index: int) -> tuple[int, int, int]:
    """A distinct, reproducible RGB colour per sample index."""
    rng = np.random.default_rng(index)
    r, g, b = rng.integers(0, 256, 3).tolist()
    return (r, g, b)


def solid_image(index: int) -> tuple[Image.Image, tuple[int, int, int]]:
    """A uniform image in one of several PIL modes, and the RGB it must decode to."""
    size = (20 + index % 13, 24 + index % 7)
    r, g, b = solid_colour(index)
    grey = (r + g + b) // 3
    kind = index % 6
    if kind == 0:
        return Image.new("RGB", size, (r, g, b)), (r, g, b)
    if kind == 1:
        return Image.new("L", size, grey), (grey, grey, grey)
    if kind == 2:
        return Image.new("RGBA", size, (r, g, b, 90)), (r, g, b)
    if kind == 3:
        palette = Image.new("P", size, 1)
        palette.putpalette([0, 0, 0, r, g, b] + [0] * (256 * 3 - 6))
        return palette, (r, g, b)
    if kind == 4:
        # 16-bit grey: value v16 must come out as round(v16 / 257) (not clipped to 255).
        v16 = grey * 257 + 100
        return Image.fromarray(np.full(size[::-1], v16, dtype=np.uint16)), (grey, grey, grey)
    return Image.new("LA", size, (grey, 200)), (grey, grey, grey)


@pytest.fixture(scope="session")
def solid_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardSet, dict[str, tuple[int, int, int]]]:
    """64 uniform images in assorted modes (8 shards of 8) and each key's expected RGB."""
    root = tmp_path_factory.mktemp("solid")
    expected: dict[str, tuple[int, int, int]] = {}
    samples = []
    for i in range(64):
        image, rgb = solid_image(i)
        key = f"solid-{i:04d}"
        expected[key] = rgb
        samples.append({"__key__": key, "png": png_bytes(image)})
    write_shards(samples, str(root), prefix="solid", shard_size=8)
    keys = list(expected)
    return ShardSet(root, manifest_url(str(root), "solid"), keys, {k: i // 8 for i, k in enumerate(keys)}), expected


@pytest.fixture(scope="session")
def bad_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """2 shards of 8: one sample with corrupt PNG bytes, one with no image at all."""
    root = tmp_path_factory.mktemp("bad")
    samples, good = [], []
    for i in range(16):
        key = f"s-{i:02d}"
        if i == 3:
            samples.append({"__key__": key, "png": b"\x89PNG\r\n\x1a\n but then garbage"})
        elif i == 10:
            samples.append({"__key__": key, "cls": 4})
        else:
            samples.append({"__key__": key, "png": png_bytes(solid_image(i)[0]), "cls": 1})
            good.append(key)
    write_shards(samples, str(root), prefix="bad", shard_size=8)
    return root, good
