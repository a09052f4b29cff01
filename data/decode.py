"""Image bytes -> 8-bit RGB PIL image, whatever the file's mode; JPEGs optionally decoded at reduced scale.

Fast path: libjpeg can decode a JPEG directly at 1/2, 1/4 or 1/8 of its size by
scaling in the DCT domain (PIL's `Image.draft`): the inverse DCT, upsampling and
colour conversion shrink with the output, the entropy decoding of every coefficient
does not, so the saving is below the pixel ratio. `decode_rgb(data, min_size=m)`
picks the largest such reduction that keeps both sides >= m (`draft_factor`);
`data.views.draft_min_size` gives the m for which no RandomResizedCrop loses
resolution.

`decode_pixels` is what the loader uses: the same RGB pixels as a uint8 tensor,
decoding baseline/progressive RGB and grey JPEGs with simplejpeg (libjpeg-turbo's
TurboJPEG API: no PIL image object, no extra copy) and everything else - CMYK
JPEGs, PNG, WebP, ... - with PIL.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image, JpegImagePlugin

# Member extensions read as the sample's image, in order of preference.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")

# What PIL raises for bytes it cannot decode (UnidentifiedImageError is an OSError;
# truncated files raise OSError; some plugins raise SyntaxError or ValueError).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def image_extension(sample: dict[str, Any]) -> str | None:
    """The field holding the sample's image, or None if it has none."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit scaled down, palette/alpha via RGBA, alpha dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey (PNG opens as I;16 or I): 0..65535 -> 0..255 with rounding;
        # PIL's own I->RGB conversion would clip everything above 255 to white.
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0  # (H, W)
        image = Image.fromarray(np.round(grey).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P":
        # Palette transparency is only interpreted correctly through RGBA.
        image = image.convert("RGBA")
    return image.convert("RGB")


def draft_factor(width: int, height: int, min_size: int) -> int:
    """Largest f in (8, 4, 2) with ceil(width / f) and ceil(height / f) both >= min_size (and f <= both); else 1."""
    for factor in (8, 4, 2):
        # f <= both sides only matters for min_size 1; PIL's draft never reduces below that.
        if min(width, height) >= factor and -(-width // factor) >= min_size and -(-height // factor) >= min_size:
            return factor
    return 1


def decode_rgb(data: bytes, *, min_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an 8-bit RGB image; raises one of DECODE_ERRORS if unreadable.

    min_size: for a JPEG, decode at 1 / draft_factor(W, H, min_size) of its size
    (libjpeg's DCT scaling; a side becomes ceil(side / f)), so both sides stay
    >= min_size. None, and any other format: full size.
    """
    with Image.open(io.BytesIO(data)) as image:
        if min_size is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
            factor = draft_factor(image.width, image.height, min_size)
            if factor > 1:
                # PIL's draft picks the largest f in (8, 4, 2, 1) with f <= min(W // w, H // h)
                # for a requested (w, h); (W // f, H // f) makes that exactly `factor`.
                # Grey and CMYK files keep their mode (only "L"/"YCbCr" requests change it).
                image.draft("RGB", (image.width // factor, image.height // factor))
        image.load()
        return to_rgb(image)


_JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG colour spaces simplejpeg turns into RGB itself; CMYK/YCCK go through PIL.
_TURBO_COLORSPACES = frozenset({"YCbCr", "Gray", "RGB"})


def _decode_turbo(data: bytes, min_size: int | None) -> np.ndarray | None:
    """(H, W, 3) uint8 via simplejpeg, or None where PIL should decode instead."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL gives the error message (or reads what libjpeg's header check refuses)
    if colorspace not in _TURBO_COLORSPACES:
        return None
    # PIL refuses more than twice MAX_IMAGE_PIXELS at open; the same bound here.
    if Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(
            f"image size ({width * height} pixels) exceeds limit of {2 * Image.MAX_IMAGE_PIXELS} pixels"
        )
    factor = 1 if min_size is None else draft_factor(width, height, min_size)
    # min_factor=f with minimum sides ceil(side / f): TurboJPEG's only scale choice is 1/f, as PIL's draft.
    return simplejpeg.decode_jpeg(
        data,
        colorspace="RGB",
        min_height=-(-height // factor),
        min_width=-(-width // factor),
        min_factor=factor,
    )


def decode_pixels(data: bytes, *, min_size: int | None = None) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) uint8 RGB tensor (channels-last memory); as `decode_rgb`, faster for JPEGs.

    Raises one of DECODE_ERRORS if the bytes are unreadable.
    """
    pixels = _decode_turbo(data, min_size) if data.startswith(_JPEG_MAGIC) else None
    if pixels is None:
        pixels = np.array(decode_rgb(data, min_size=min_size))  # a writable copy: torch wants one
    return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W), HWC strides
