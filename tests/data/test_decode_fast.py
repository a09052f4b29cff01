"""JPEG draft-mode decoding and the view pipeline: the draft bound, accuracy, modes, determinism."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from data.config import DataConfig
from data.decode import DECODE_ERRORS, decode_pixels, decode_rgb, draft_factor
from data.views import CROP_RATIO, ToNormalizedFloat, build_view_transform, draft_min_size, make_views


def _smooth_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: a few low-frequency waves per channel plus a hard-edged block."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width, 3), 128.0, dtype=np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(0.002, 0.05, 2)
            image[..., c] += 30 * np.sin(2 * math.pi * (fx * x + fy * y) + rng.uniform(0, 2 * math.pi))
    image[height // 3 : height // 2, width // 4 : width // 2] = (200, 40, 40)
    return np.clip(image, 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _crop_sides(height: int, width: int, crop: v2.RandomResizedCrop, draws: int, seed: int = 0) -> np.ndarray:
    """(draws, 2) crop (h, w) that torchvision's RandomResizedCrop draws on an H x W image."""
    probe = tv_tensors.Image(torch.empty((1, height, width), dtype=torch.uint8))
    torch.default_generator.manual_seed(seed)
    sides = []
    for _ in range(draws):
        params = crop.make_params([probe])
        sides.append((params["height"], params["width"]))
    return np.array(sides)


@pytest.mark.parametrize(("img_size", "scale_min"), [(224, 0.2), (224, 0.08), (64, 0.2), (32, 0.5), (96, 1.0)])
def test_draft_bound_keeps_every_crop_at_least_img_size(img_size: int, scale_min: float) -> None:
    m = draft_min_size(img_size, scale_min)
    assert m == max(img_size, math.ceil(img_size / math.sqrt(scale_min * 3 / 4) - 1e-9))
    # Sampled crops on images whose short side is exactly m (square, 4:3, 3:4, very wide).
    sampler = v2.RandomResizedCrop(img_size, scale=(scale_min, 1.0), ratio=CROP_RATIO)
    for height, width in [(m, m), (m, math.ceil(m * 4 / 3)), (math.ceil(m * 4 / 3), m), (m, 5 * m)]:
        sides = _crop_sides(height, width, sampler, 300)
        assert sides.min() >= img_size, (height, width, sides.min())
    # The extreme crops (smallest area, most elongated) pinned by degenerate ranges: still >= img_size
    # at side m, and below it somewhat under the bound, so the bound is tight for square images.
    # (At s = 1 a pinned elongated crop never fits, and the fallback of a pinned ratio is no extreme.)
    if scale_min < 1.0:
        for ratio in [(3 / 4, 3 / 4), (4 / 3, 4 / 3)]:
            extreme = v2.RandomResizedCrop(img_size, scale=(scale_min, scale_min), ratio=ratio)
            assert _crop_sides(m, m, extreme, 2).min() >= img_size
            smaller = math.floor(m * 0.98)
            assert _crop_sides(smaller, smaller, extreme, 2).min() < img_size


def test_crops_of_a_drafted_jpeg_keep_img_size() -> None:
    img_size, scale_min = 32, 0.2
    m = draft_min_size(img_size, scale_min)  # 83
    data = _encode(Image.fromarray(_smooth_rgb(500, 375)), quality=90)
    fast = decode_rgb(data, min_size=m)
    assert fast.size == (125, 94)  # 1/4: 1/8 would give 63 x 47 < 83
    sides = _crop_sides(fast.height, fast.width, v2.RandomResizedCrop(img_size, scale=(scale_min, 1.0)), 500)
    assert sides.min() >= img_size


def test_draft_factor_is_the_largest_reduction_keeping_min_size() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        width, height = (int(v) for v in rng.integers(1, 400, 2))
        min_size = int(rng.integers(1, 120))
        # Brute force: every factor whose output keeps both sides >= min_size (and >= 1 pixel per block).
        ok = [
            f
            for f in (1, 2, 4, 8)
            if math.ceil(width / f) >= min_size and math.ceil(height / f) >= min_size and min(width, height) >= f
        ]
        assert draft_factor(width, height, min_size) == max(ok, default=1)


@pytest.mark.parametrize(("width", "height"), [(37, 61), (120, 90), (257, 130), (300, 300)])
def test_decode_picks_the_largest_reduction_for_real_jpegs(width: int, height: int) -> None:
    data = _encode(Image.fromarray(_smooth_rgb(width, height)), quality=85)
    for min_size in range(2, min(width, height) + 2, 7):
        f = draft_factor(width, height, min_size)
        out = decode_rgb(data, min_size=min_size)
        assert out.mode == "RGB"
        assert out.size == (math.ceil(width / f), math.ceil(height / f)), (min_size, f, out.size)
        if f > 1 or min_size <= min(width, height):
            assert min(out.size) >= min_size


@pytest.mark.parametrize(("min_size", "factor"), [(300, 2), (180, 4), (90, 8)])
def test_fast_decode_agrees_with_full_decode_then_resize(min_size: int, factor: int) -> None:
    data = _encode(Image.fromarray(_smooth_rgb(1000, 750)), quality=90)
    full = decode_rgb(data)
    fast = decode_rgb(data, min_size=min_size)
    assert fast.size == (math.ceil(1000 / factor), math.ceil(750 / factor))
    # Compare on whole f x f blocks (the last drafted row/column covers a partial block).
    w, h = 1000 // factor, 750 // factor
    reference = full.resize((w, h), Image.Resampling.BOX, box=(0, 0, w * factor, h * factor))
    err = np.abs(np.asarray(fast, dtype=np.float32)[:h, :w] - np.asarray(reference, dtype=np.float32))
    assert err.mean() < 2.5, err.mean()  # measured ~1.0-1.5 grey levels
    assert np.percentile(err, 99) < 10


@pytest.mark.parametrize("min_size", [None, 40])
def test_grey_and_cmyk_jpegs_come_out_rgb(min_size: int | None) -> None:
    grey = _encode(Image.fromarray(np.full((200, 160), 90, dtype=np.uint8), mode="L"), quality=95)
    out = decode_rgb(grey, min_size=min_size)
    assert out.mode == "RGB" and out.size == ((160, 200) if min_size is None else (40, 50))
    assert np.abs(np.asarray(out, dtype=np.int16) - 90).max() <= 1

    # Pure red in CMYK: C=0, M=255, Y=255, K=0 -> RGB (255, 0, 0).
    cmyk = _encode(Image.new("CMYK", (200, 160), (0, 255, 255, 0)), quality=95)
    out = decode_rgb(cmyk, min_size=min_size)
    assert out.mode == "RGB" and out.size == ((200, 160) if min_size is None else (50, 40))
    assert np.abs(np.asarray(out, dtype=np.int16) - np.array([255, 0, 0])).max() <= 2


def test_non_jpeg_is_decoded_at_full_size_unchanged() -> None:
    pixels = _smooth_rgb(320, 240)
    for fmt in ("PNG", "WEBP"):
        data = _encode(Image.fromarray(pixels), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        out = decode_rgb(data, min_size=16)
        assert out.size == (320, 240)
        assert np.array_equal(np.asarray(out), pixels)


def test_to_normalized_float_equals_todtype_then_normalize() -> None:
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    image = tv_tensors.Image(
        torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    )
    expected = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)])(image)
    got = ToNormalizedFloat(mean, std)(image)
    assert isinstance(got, tv_tensors.Image) and got.dtype == torch.float32
    assert torch.equal(got.as_subclass(torch.Tensor), expected.as_subclass(torch.Tensor))
    with pytest.raises(TypeError, match="uint8"):
        ToNormalizedFloat(mean, std)(image.float())


def test_make_views_is_a_pure_function_of_the_seed() -> None:
    image = Image.fromarray(_smooth_rgb(500, 375))
    transform = build_view_transform(DataConfig(), 64)
    torch.default_generator.manual_seed(123)
    before = torch.get_rng_state()
    first = make_views(image, transform, 3, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # caller's RNG untouched
    torch.default_generator.manual_seed(999)  # a different global state changes nothing
    again = make_views(image, transform, 3, seed=7)
    other = make_views(image, transform, 3, seed=8)
    for a, b in zip(first, again, strict=True):
        assert a.shape == (3, 64, 64) and a.dtype == torch.uint8
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # views of one image differ
    assert not torch.equal(first[0], other[0])

    # Normalised (as the stream does per batch): the same values as the plain torchvision
    # recipe drawing from the same RNG stream.
    cfg = DataConfig()
    plain = v2.Compose(
        [
            v2.RandomResizedCrop(64, scale=(cfg.crop_scale_min, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=cfg.mean, std=cfg.std),
        ]
    )
    torch.default_generator.manual_seed(7)
    pixels = tv_tensors.Image(v2.functional.pil_to_tensor(image))
    reference = [plain(pixels).as_subclass(torch.Tensor) for _ in range(3)]
    normalise = ToNormalizedFloat(cfg.mean, cfg.std)
    batch = normalise(torch.stack(first))  # (3 views, 3, 64, 64) at once
    for a, b in zip(batch, reference, strict=True):
        assert torch.equal(a, b)


def _pil_pixels(data: bytes, min_size: int | None = None) -> torch.Tensor:
    return torch.from_numpy(np.array(decode_rgb(data, min_size=min_size))).permute(2, 0, 1)


@pytest.mark.parametrize(
    ("mode", "kwargs"),
    [("RGB", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0}), ("L", {}), ("CMYK", {})],
    ids=["baseline-420", "progressive", "444", "grey", "cmyk-via-pil"],
)
@pytest.mark.parametrize("min_size", [None, 100, 50])
def test_decode_pixels_equals_pil_pixel_for_pixel(mode: str, kwargs: dict, min_size: int | None) -> None:
    """simplejpeg (RGB/grey JPEGs) and PIL (the rest) give the same uint8 pixels, drafted or not."""
    data = _encode(Image.fromarray(_smooth_rgb(420, 300)).convert(mode), **kwargs)
    got = decode_pixels(data, min_size=min_size)
    want = _pil_pixels(data, min_size)
    assert got.dtype == torch.uint8 and got.shape == want.shape and got.shape[0] == 3
    if min_size is not None:  # drafted by 1/2 (>= 100) and 1/4 (>= 50): ceil(side / f)
        factor = draft_factor(420, 300, min_size)
        assert factor == {100: 2, 50: 4}[min_size]
        assert got.shape[1:] == (-(-300 // factor), -(-420 // factor))
    assert torch.equal(got, want)


def test_decode_pixels_non_jpeg_and_bad_bytes() -> None:
    png = _encode(Image.fromarray(_smooth_rgb(40, 30)).convert("LA"), "PNG")
    assert torch.equal(decode_pixels(png), _pil_pixels(png))
    with pytest.raises(DECODE_ERRORS):
        decode_pixels(b"\xff\xd8\xff\xe0 not a jpeg at all")
    with pytest.raises(DECODE_ERRORS):
        decode_pixels(b"")


def test_decode_pixels_refuses_a_jpeg_bomb_before_decoding() -> None:
    data = bytearray(_encode(Image.fromarray(_smooth_rgb(64, 48))))
    sof = data.index(b"\xff\xc0")  # baseline start-of-frame: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    with pytest.raises(Image.DecompressionBombError):
        decode_pixels(bytes(data))
