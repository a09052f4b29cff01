"""Pictures an objective draws during a run: images, id maps, heat maps and plots as uint8 RGB.

Images, id maps and heat maps are drawn with numpy alone; plots (usage histograms, confusion
matrices) with matplotlib, with axes, labels and a title, then rendered to pixels. Every
renderer returns an (H, W, 3) uint8 array; `grid` lays panels out in rows and upscales them
(nearest neighbour) so that 32-pixel images stay legible. `Objective.pictures` returns
`{name: array}`; rank 0 logs each as an MLflow image series `pictures/<name>` (with its
step) and the last one also as `pictures/<name>.png`. `objectives.components.zero.gathered_outside_forward` makes the
model callable from `pictures` under DeepSpeed ZeRO-3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# At most this many images of a batch go into a picture.
MAX_IMAGES = 8
# Grey of masked patches in the MAE picture.
MASK_GREY = 128
# Cells of an id map without an id (id < 0), e.g. positions a model did not predict: neutral
# grey, never a palette colour (the palette has saturation >= 0.55).
EMPTY_COLOUR = (192, 192, 192)

# Golden-ratio conjugate: hue steps of it never repeat and keep consecutive ids far apart.
_GOLDEN = 0.6180339887498949
_SATURATIONS = (0.9, 0.55)
_VALUES = (0.95, 0.7, 0.5)

# Anchors of the heat-map ramp, dark -> bright, an inferno-like sequence (black, purple, red,
# orange, yellow, pale yellow) whose luminance rises strictly, so brighter always means larger.
_RAMP_ANCHORS = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float64,
)
RAMP_SIZE = 256


# --- images ------------------------------------------------------------------------------


def to_uint8_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised images (B, 3, H, W), any float dtype -> (B, H, W, 3) uint8: x * std + mean, clipped to [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    pixels = (images.detach().float() * s + m).clamp(0.0, 1.0)  # (B, 3, H, W) in [0, 1]
    return (pixels * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def display_scale(size: int, target: int = 128) -> int:
    """Integer upscale that brings a panel of `size` pixels to about `target` (1 for large images)."""
    return max(1, target // max(1, size))


def _check_panel(panel: np.ndarray, where: str) -> None:
    if panel.ndim != 3 or panel.shape[2] != 3 or panel.dtype != np.uint8:
        raise ValueError(f"{where}: a panel must be an (H, W, 3) uint8 array, got {panel.dtype} {panel.shape}")


def grid(rows: list[list[np.ndarray]], *, pad: int = 2, scale: int = 1, background: int = 255) -> np.ndarray:
    """Panels (H, W, 3) uint8 in rows and columns with `pad` pixels around each, upscaled `scale` times.

    A column is as wide as its widest panel, a row as tall as its tallest; panels sit at the
    top left of their cell. Panel (r, c) of equal-sized (h, w) panels starts at
    y = pad + r * (h * scale + pad), x = pad + c * (w * scale + pad).
    """
    if scale < 1 or pad < 0:
        raise ValueError(f"grid: scale must be >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    if not rows or not any(rows):
        raise ValueError("grid: no panels")
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            _check_panel(panel, f"grid row {r} column {c}")
    heights = [max((p.shape[0] for p in row), default=0) * scale for row in rows]
    columns = max(len(row) for row in rows)
    widths = [max((row[c].shape[1] for row in rows if c < len(row)), default=0) * scale for c in range(columns)]
    out = np.full((sum(heights) + pad * (len(rows) + 1), sum(widths) + pad * (columns + 1), 3), background, np.uint8)
    y = pad
    for row, height in zip(rows, heights, strict=True):
        x = pad
        for c, panel in enumerate(row):
            big = panel.repeat(scale, axis=0).repeat(scale, axis=1)
            out[y : y + big.shape[0], x : x + big.shape[1]] = big
            x += widths[c] + pad
        y += height + pad
    return out


# --- ids -----------------------------------------------------------------------------------


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] (...,) each -> RGB in [0, 1] (..., 3), the standard six-sector formula."""
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.astype(np.int64) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros((*h.shape, 3))
    for k, (r, g, b) in enumerate(choices):
        hit = sector == k
        rgb[hit] = np.stack([r[hit], g[hit], b[hit]], axis=-1)
    return rgb


def id_colours(ids: np.ndarray, num_ids: int) -> np.ndarray:
    """A colour per id, (...,) int in [0, num_ids) -> (..., 3) uint8; it depends on the id alone.

    hue = frac(id * 0.618...) (golden-ratio steps: consecutive ids are ~222 degrees apart),
    saturation alternates 0.9 / 0.55 with the id's parity and value cycles 0.95 / 0.7 / 0.5
    every two ids, so ids with close hues still differ in brightness.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"id_colours: ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_ids):
        raise ValueError(f"id_colours: ids must be in [0, {num_ids}), got [{ids.min()}, {ids.max()}]")
    ids = ids.astype(np.int64)
    hue = np.mod(ids * _GOLDEN, 1.0)
    sat = np.asarray(_SATURATIONS)[ids % len(_SATURATIONS)]
    val = np.asarray(_VALUES)[(ids // 2) % len(_VALUES)]
    return np.round(_hsv_to_rgb(hue, sat, val) * 255.0).astype(np.uint8)


def _blocks(cells: np.ndarray, cell: int) -> np.ndarray:
    """(gh, gw, 3) -> (gh * cell, gw * cell, 3): each cell replicated cell x cell."""
    if cell < 1:
        raise ValueError(f"cell must be >= 1 pixel, got {cell}")
    return cells.repeat(cell, axis=0).repeat(cell, axis=1)


def id_map(ids: np.ndarray, num_ids: int, cell: int) -> np.ndarray:
    """Ids on a patch grid (gh, gw) -> (gh * cell, gw * cell, 3) uint8; cells with id < 0 get EMPTY_COLOUR."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"id_map: ids must be a (gh, gw) grid, got shape {ids.shape}")
    empty = ids < 0
    colours = id_colours(np.where(empty, 0, ids), num_ids)  # (gh, gw, 3)
    colours[empty] = EMPTY_COLOUR
    return _blocks(colours, cell)


# --- heat maps -------------------------------------------------------------------------------


def colour_ramp(size: int = RAMP_SIZE) -> np.ndarray:
    """The heat-map ramp: (size, 3) uint8, index 0 darkest, size - 1 brightest (piecewise linear in RGB)."""
    at = np.linspace(0.0, len(_RAMP_ANCHORS) - 1, size)
    low = np.minimum(np.floor(at).astype(np.int64), len(_RAMP_ANCHORS) - 2)
    frac = (at - low)[:, None]
    rgb = _RAMP_ANCHORS[low] * (1 - frac) + _RAMP_ANCHORS[low + 1] * frac
    return np.round(rgb).astype(np.uint8)


def heat_map(values: np.ndarray, cell: int, *, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Values (h, w) -> (h * cell, w * cell, 3) uint8 on `colour_ramp`: low -> darkest, high -> brightest.

    low/high default to the values' min and max (min-max scaling); a constant map is all darkest.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"heat_map: values must be (h, w), got shape {values.shape}")
    lo = float(values.min()) if low is None else low
    hi = float(values.max()) if high is None else high
    span = hi - lo
    scaled = np.clip((values - lo) / span, 0.0, 1.0) if span > 0 else np.zeros_like(values)
    index = np.round(scaled * (RAMP_SIZE - 1)).astype(np.int64)
    return _blocks(colour_ramp()[index], cell)


# --- plots (matplotlib: axes, labels, a title) --------------------------------------------------

# Plot size in inches at PLOT_DPI: 400 x 260 pixels, legible in the MLflow UI's artifact view.
PLOT_SIZE = (4.0, 2.6)
PLOT_DPI = 100
BAR_COLOUR = "#345ca8"
# Class names on the confusion matrix's axes up to this many classes; each cell's fraction
# written in it up to MAX_ANNOTATED_CLASSES.
MAX_NAMED_CLASSES = 20
MAX_ANNOTATED_CLASSES = 10


def _figure(size: tuple[float, float] = PLOT_SIZE) -> Any:
    """A matplotlib Figure on the Agg canvas: no pyplot, no global state, safe in any thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=PLOT_DPI)
    FigureCanvasAgg(figure)
    return figure


def figure_pixels(figure: Any) -> np.ndarray:
    """A matplotlib figure rendered on its Agg canvas -> (H, W, 3) uint8, like the other pictures."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def usage_histogram_figure(counts: np.ndarray, what: str = "codes") -> Any:
    """Rank-frequency bars of code/centroid counts (K,): bar r is the r-th most used one's count.

    x: rank 1..K, most used first; y: how many of the batch's tokens took it; the title says
    how many of the K were used at all. A healthy codebook shows a long, even run of bars; a
    collapsing one a few tall bars and then nothing.
    """
    counts = np.asarray(counts, dtype=np.float64).ravel()
    k = counts.size
    if k == 0 or (counts < 0).any():
        raise ValueError(f"usage_histogram: counts must be a non-empty (K,) array of counts >= 0, got {counts}")
    from matplotlib.ticker import MaxNLocator

    ordered = np.sort(counts)[::-1]
    figure = _figure()
    ax = figure.add_subplot()
    ax.bar(np.arange(1, k + 1), ordered, width=1.0, color=BAR_COLOUR, linewidth=0)
    ax.set_xlim(0.5, k + 0.5)
    ax.set_ylim(0, max(1.0, float(ordered[0])) * 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ranks and counts are whole numbers
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"{what} by rank, most used first")
    ax.set_ylabel("tokens in the batch")
    ax.set_title(f"{int((counts > 0).sum())} of {k} {what} used", fontsize=10)
    figure.tight_layout()
    return figure


def usage_histogram(counts: np.ndarray, what: str = "codes") -> np.ndarray:
    """`usage_histogram_figure` as an (H, W, 3) uint8 picture."""
    return figure_pixels(usage_histogram_figure(counts, what))


def confusion_figure(matrix: np.ndarray, class_names: list[str] | None = None) -> Any:
    """A confusion matrix (C, C) of counts, rows true and columns predicted, as a labelled heat map.

    Each row is normalised to sum 1 (an empty row stays 0), so a cell is the fraction of a true
    class predicted as the column's class; the colour bar spans [0, 1] and the title gives the
    top-1 accuracy over all counted samples. A good encoder makes a bright diagonal.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion_image: matrix must be (C, C), got shape {matrix.shape}")
    c = matrix.shape[0]
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"confusion_image: {len(class_names)} class names for a {c} x {c} matrix")
    sums = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)
    side = min(8.0, 3.2 + 0.25 * c)
    figure = _figure((side + 1.0, side))
    ax = figure.add_subplot()
    shown = ax.imshow(fractions, cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04).set_label("fraction of the true class")
    if c <= MAX_NAMED_CLASSES:
        names = class_names or [str(i) for i in range(c)]
        ax.set_xticks(range(c), names, rotation=90)
        ax.set_yticks(range(c), names)
    if c <= MAX_ANNOTATED_CLASSES:
        for r in range(c):
            for col in range(c):
                dark_text = fractions[r, col] > 0.6  # the ramp's bright end
                ax.text(col, r, f"{fractions[r, col]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if dark_text else "white")  # fmt: skip
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = matrix.sum()
    accuracy = float(np.trace(matrix) / total) if total > 0 else 0.0
    ax.set_title(f"top-1 {100 * accuracy:.1f}% of {int(total)} samples", fontsize=10)
    figure.tight_layout()
    return figure


def confusion_image(matrix: np.ndarray, class_names: list[str] | None = None) -> np.ndarray:
    """`confusion_figure` as an (H, W, 3) uint8 picture."""
    return figure_pixels(confusion_figure(matrix, class_names))
