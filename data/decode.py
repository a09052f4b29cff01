"""Image bytes -> 8-bit RGB PIL image, whatever the file's mode."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

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


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an 8-bit RGB image; raises one of DECODE_ERRORS if unreadable."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)
