"""Pictures: the renderers and plots against hand-built cases, each objective's panels against brute force."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from data.masks import block_patch_mask, random_patch_mask
from objectives.base import RunContext
from objectives.beitv2 import BEiTv2
from objectives.ccvit import CCViT
from objectives.components.pictures import (
    BAR_COLOUR,
    EMPTY_COLOUR,
    MASK_GREY,
    colour_ramp,
    confusion_figure,
    confusion_image,
    grid,
    heat_map,
    id_colours,
    id_map,
    to_uint8_images,
    usage_histogram,
    usage_histogram_figure,
)
from objectives.components.teacher import Teacher
from objectives.components.tokenizer import VQTokenizer, encode_head
from objectives.configs import BEiTv2Config, CCViTConfig, MAEConfig, SemAIMConfig, SimCLRConfig, VQKDConfig
from objectives.mae import MAE
from objectives.semaim import SemAIM
from objectives.simclr import SimCLR
from objectives.vqkd import VQKD
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
MODEL = ModelConfig(arch=ARCH, **TINY)
SIZE, PATCH, GRID = 32, 8, 4
N = GRID * GRID
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CONTEXT = RunContext(input_mean=MEAN, input_std=STD)
# Pictures of 32-pixel images: 4x upscale, 2 pixels of padding; at most 8 images of a batch.
SCALE, PAD, ROWS = 4, 2, 8
BATCH = 10  # more than ROWS: the extra images must be left out


# --- helpers ---------------------------------------------------------------------------------


def uint8_images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)


def normalised(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) normalised with MEAN/STD, as the data pipeline."""
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def panel(picture: np.ndarray, row: int, col: int, size: int = SIZE) -> np.ndarray:
    """Panel (row, col) of a grid of size x size panels, back at its own resolution."""
    step = size * SCALE + PAD
    y, x = PAD + row * step, PAD + col * step
    big = picture[y : y + size * SCALE, x : x + size * SCALE]
    small = big[::SCALE, ::SCALE]
    assert np.array_equal(big, small.repeat(SCALE, 0).repeat(SCALE, 1))  # a clean nearest-neighbour upscale
    return small


def check_layout(picture: np.ndarray, columns: int) -> None:
    step = SIZE * SCALE + PAD
    assert picture.shape == (PAD + ROWS * step, PAD + columns * step, 3) and picture.dtype == np.uint8


def block(image: np.ndarray, i: int) -> np.ndarray:
    """Pixels (PATCH, PATCH, 3) of patch i (row-major) of an (H, W, 3) image."""
    row, col = divmod(i, GRID)
    return image[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH]


def cells(colours: np.ndarray) -> np.ndarray:
    """(GRID, GRID, 3) colours, each replicated over its PATCH x PATCH patch."""
    return colours.repeat(PATCH, 0).repeat(PATCH, 1)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


def to_pixels_u8(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded."""
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


# --- renderers -------------------------------------------------------------------------------


def test_to_uint8_images_inverts_the_normalisation_and_clips() -> None:
    pixels = uint8_images(3, 0)
    x = normalised(pixels)
    assert np.array_equal(to_uint8_images(x, MEAN, STD), pixels)
    assert np.array_equal(to_uint8_images(x.bfloat16(), MEAN, STD), to_uint8_images(x.bfloat16().float(), MEAN, STD))
    # Channel 0: (v * 0.2 + 0.5) -> -10 clips to 0, +10 to 255, 0.25 -> 0.55 * 255 = 140.25 -> 140.
    y = torch.tensor([-10.0, 10.0, 0.25]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert to_uint8_images(y, MEAN, STD)[0, 0, :, 0].tolist() == [0, 255, 140]


def test_grid_places_padded_upscaled_panels() -> None:
    a = np.full((2, 3, 3), 10, np.uint8)
    b = np.full((1, 2, 3), 20, np.uint8)
    c = np.full((2, 2, 3), 30, np.uint8)
    out = grid([[a, b], [c]], pad=1, scale=2, background=255)
    # Column widths 6 and 4, row heights 4 and 4, 1 pixel of padding around every cell.
    assert out.shape == (1 + 4 + 1 + 4 + 1, 1 + 6 + 1 + 4 + 1, 3)
    expected = np.full(out.shape, 255, np.uint8)
    expected[1:5, 1:7] = 10
    expected[1:3, 8:12] = 20  # top left of its cell
    expected[6:10, 1:5] = 30
    assert np.array_equal(out, expected)
    with pytest.raises(ValueError, match="uint8"):
        grid([[a.astype(np.float32)]])


def test_id_colours_are_a_fixed_function_of_the_id_and_distinct() -> None:
    ids = np.array([[3, 7], [3, 0]])
    colours = id_colours(ids, 8)
    assert colours.shape == (2, 2, 3) and colours.dtype == np.uint8
    assert np.array_equal(colours[0, 0], colours[1, 0])  # same id, same colour
    assert np.array_equal(id_colours(np.array([3]), 8192)[0], colours[0, 0])  # whatever the vocabulary
    for start in (0, 1000, 8128):
        block64 = id_colours(np.arange(start, start + 64), 8192)
        assert len({tuple(c) for c in block64}) == 64
        # Neighbouring ids look different: far apart in RGB.
        assert np.abs(np.diff(block64.astype(int), axis=0)).sum(axis=1).min() > 60
    # No palette colour is the grey of empty cells.
    assert not (id_colours(np.arange(8192), 8192) == np.array(EMPTY_COLOUR)).all(axis=1).any()
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        id_colours(np.array([8]), 8)


def test_id_map_replicates_cells_and_greys_empty_ones() -> None:
    ids = np.array([[0, 5], [-1, 2]])
    out = id_map(ids, 6, cell=3)
    assert out.shape == (6, 6, 3)
    palette = id_colours(np.arange(6), 6)
    for (r, c), value in np.ndenumerate(ids):
        want = EMPTY_COLOUR if value < 0 else palette[value]
        assert (out[3 * r : 3 * r + 3, 3 * c : 3 * c + 3] == np.array(want, np.uint8)).all()


def test_colour_ramp_and_heat_map_run_dark_to_bright() -> None:
    ramp = colour_ramp()
    assert ramp.shape == (256, 3)
    assert (np.diff(luminance(ramp)) > 0).all()  # strictly brighter along the ramp
    out = heat_map(np.array([[10.0, 11.0], [12.0, 13.0]]), cell=2)
    # Min-max scaled: 0, 1/3, 2/3, 1 -> ramp indices 0, 85, 170, 255.
    for (r, c), index in np.ndenumerate(np.array([[0, 85], [170, 255]])):
        assert (out[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] == ramp[index]).all()
    assert (heat_map(np.full((2, 2), 4.0), cell=1) == ramp[0]).all()  # constant: all darkest
    fixed = heat_map(np.array([[-1.0, 0.5, 2.0]]), cell=1, low=0.0, high=1.0)  # clipped to [0, 1]
    assert np.array_equal(fixed[0], ramp[[0, 128, 255]])


def test_usage_histogram_bars_axes_and_title_by_hand() -> None:
    counts = np.array([0, 5, 0, 3, 9, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 1])  # 6 of 16 codes used
    figure = usage_histogram_figure(counts, "codes")
    (ax,) = figure.axes
    # Rank-frequency: bar r (x = r, width 1) is the r-th largest count, sorted 9, 5, 3, 2, 1, 1, 0...
    bars = sorted(ax.patches, key=lambda bar: bar.get_x())
    assert [bar.get_height() for bar in bars] == [9, 5, 3, 2, 1, 1] + [0] * 10
    assert [bar.get_x() + bar.get_width() / 2 for bar in bars] == list(range(1, 17))
    assert ax.get_title() == "6 of 16 codes used"
    assert ax.get_xlabel() == "codes by rank, most used first" and ax.get_ylabel() == "tokens in the batch"
    assert ax.get_ylim()[1] > 9 and ax.get_xlim() == (0.5, 16.5)  # every bar inside the axes
    # Rendered: 400 x 260 pixels, the bars' colour present, the axes' black text and lines too.
    out = usage_histogram(counts, "codes")
    assert out.shape == (260, 400, 3) and out.dtype == np.uint8
    bar_pixels = (out == np.array(to_rgb_u8(BAR_COLOUR), np.uint8)).all(axis=2).sum()
    assert bar_pixels > 1000
    assert (out < 60).all(axis=2).sum() > 500
    assert np.array_equal(out, usage_histogram(counts, "codes"))  # deterministic: same counts, same pixels
    with pytest.raises(ValueError, match="counts >= 0"):
        usage_histogram(np.array([1, -1]))


def to_rgb_u8(colour: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (r, g, b)."""
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def test_confusion_figure_of_a_hand_case() -> None:
    matrix = np.array([[1, 3, 0], [0, 0, 0], [2, 0, 6]])
    figure = confusion_figure(matrix, ["cat", "dog", "bird"])
    ax = next(a for a in figure.axes if a.get_xlabel() == "predicted class")
    assert ax.get_ylabel() == "true class"
    # Rows normalised by hand: [1, 3, 0] / 4, the empty row stays 0, [2, 0, 6] / 8.
    shown = np.asarray(ax.images[0].get_array())
    assert np.allclose(shown, [[0.25, 0.75, 0], [0, 0, 0], [0.25, 0, 0.75]])
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "bird"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "bird"]
    # Accuracy over every counted sample: (1 + 0 + 6) / 12.
    assert ax.get_title() == "top-1 58.3% of 12 samples"
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in shown.ravel())
    colour_bar = next(a for a in figure.axes if a is not ax)
    assert colour_bar.get_ylabel() == "fraction of the true class"
    out = confusion_image(matrix, ["cat", "dog", "bird"])
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8 and out.shape[0] >= 300
    # Many classes: indices, no names or numbers in the cells beyond the limits.
    many = confusion_figure(np.eye(30))
    big = next(a for a in many.axes if a.get_xlabel() == "predicted class")
    assert not big.texts and big.get_title() == "top-1 100.0% of 30 samples"
    with pytest.raises(ValueError, match="2 class names for a 3 x 3 matrix"):
        confusion_image(matrix, ["cat", "dog"])


# --- the base class -----------------------------------------------------------------------


def test_base_objective_draws_nothing() -> None:
    torch.manual_seed(0)
    model = SimCLR(SimCLRConfig(), build_backbone(MODEL), CONTEXT).eval()
    x = normalised(uint8_images(2, 1))
    with torch.no_grad():
        assert model.pictures({"views": [x, x]}) == {}


# --- MAE --------------------------------------------------------------------------------------------


def small_mae(norm_pix: bool) -> MAE:
    torch.manual_seed(0)
    cfg = MAEConfig(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix)
    return MAE(cfg, build_backbone(MODEL), CONTEXT).eval()


def random_masks(batch: int, seed: int, ratio: float = 0.75) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([random_patch_mask((GRID, GRID), gen, ratio=ratio) for _ in range(batch)])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_reconstruction_by_hand(norm_pix: bool) -> None:
    mae = small_mae(norm_pix)
    pixels = uint8_images(BATCH, 2)
    x, mask = normalised(pixels), random_masks(BATCH, 3)  # 12 of 16 patches masked
    with torch.no_grad():
        pictures = mae.pictures({"views": [x], "mask": mask})
        # The decoder's output by hand: the visible patches in *descending* order (any order gives the
        # same result), then the masked ones; restore = the inverse permutation.
        shuffle = torch.stack([torch.cat([(~m).nonzero().flatten().flip(0), m.nonzero().flatten()]) for m in mask])
        restore = shuffle.argsort(dim=1)
        tokens = mae.backbone.embed_patches(x)
        latent = mae.backbone.encode(tokens, keep_idx=shuffle[:, :4]).tokens
        pred = mae.forward_decoder(latent, restore).double().numpy()  # (B, N, 8 * 8 * 3), (row, col, channel)
    assert set(pictures) == {"mae_reconstruction"}
    picture = pictures["mae_reconstruction"]
    check_layout(picture, columns=3)
    xs = x.permute(0, 2, 3, 1).double().numpy()  # (B, H, W, 3) normalised
    mean, std = np.array(MEAN), np.array(STD)
    changed = off_by_one = total = 0
    for b in range(ROWS):
        original, masked, rebuilt = (panel(picture, b, c) for c in range(3))
        assert np.array_equal(original, pixels[b])
        for i in range(N):
            if not mask[b, i]:
                assert np.array_equal(block(masked, i), block(pixels[b], i))
                assert np.array_equal(block(rebuilt, i), block(pixels[b], i))
                continue
            assert (block(masked, i) == MASK_GREY).all()
            target = block(xs[b], i).reshape(-1)  # the original patch, normalised units
            p = pred[b, i]
            if norm_pix:  # undo the per-patch normalisation with the original patch's mean and unbiased std
                p = p * math.sqrt(target.var(ddof=1) + 1e-6) + target.mean()
            want = to_pixels_u8(p.reshape(PATCH, PATCH, 3) * std + mean)
            got = block(rebuilt, i)
            off = np.abs(got.astype(int) - want.astype(int))
            assert off.max() <= 1  # float32 vs float64 rounding at the .5 boundaries
            off_by_one += int(off.sum())
            total += off.size
            changed += int(np.abs(got.astype(int) - block(pixels[b], i).astype(int)).max() > 10)
    assert off_by_one <= 0.002 * total  # ... which are rare: nearly every pixel is exact
    assert changed > 0  # the untrained prediction is not the original


def test_mae_without_a_batch_mask_draws_its_own() -> None:
    mae = small_mae(True)
    pixels = uint8_images(3, 4)
    with torch.no_grad():
        picture = mae.pictures({"views": [normalised(pixels)]})["mae_reconstruction"]
    for b in range(3):
        masked = panel(picture, b, 1)
        grey = [bool((block(masked, i) == MASK_GREY).all()) for i in range(N)]
        assert sum(grey) == 12  # 75% of 16
        assert all(np.array_equal(block(masked, i), block(pixels[b], i)) for i in range(N) if not grey[i])


# --- BEiT v2 ------------------------------------------------------------------------------------


def tiny_tokenizer(num_codes: int = 16) -> VQTokenizer:
    torch.manual_seed(5)
    backbone = build_backbone(MODEL)
    codebook = F.normalize(torch.randn(num_codes, 8), dim=1)
    return VQTokenizer(backbone, encode_head(32, 8), codebook, input_mean=MEAN, input_std=STD)


def nearest_codes(vit: torch.nn.Module, head: torch.nn.Module, codebook: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """Brute force: timm's own forward_features -> head -> unit vectors -> the closest code (L2). (B, N)."""
    z = F.normalize(head(vit.forward_features(x)[:, 1:]).double(), dim=-1)  # (B, N, d)
    dists = ((z.unsqueeze(2) - codebook.double().view(1, 1, *codebook.shape)) ** 2).sum(-1)  # (B, N, K)
    return dists.argmin(-1).numpy()


def test_beitv2_token_ids_are_the_tokenizers_codes_and_the_predictions_at_masked_patches() -> None:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(6)
    cfg = BEiTv2Config(tokenizer="<given>", mask_ratio=0.375)
    context = replace(CONTEXT, inputs={"tokenizer": tokenizer})
    model = BEiTv2(cfg, build_backbone(ModelConfig(arch=ARCH, **{**TINY, "depth": 4})), context)
    model.eval()
    pixels = uint8_images(BATCH, 7)
    x = normalised(pixels)
    gen = torch.Generator().manual_seed(8)
    mask = torch.stack([block_patch_mask((GRID, GRID), gen, ratio=0.375) for _ in range(BATCH)])  # 6 of 16
    with torch.no_grad():
        pictures = model.pictures({"views": [x], "mask": mask})
        codes = nearest_codes(tokenizer.backbone.vit, tokenizer.encode_head, tokenizer.codebook, x)
        # The LM head on the final tokens at every position; only the masked ones are shown.
        bb = model.backbone
        tokens = bb.encode(bb.embed_patches(x, mask=mask, mask_token=model.mask_token)).tokens[:, 1:]
        every = model.lm_head(tokens).argmax(-1).numpy()  # (B, N)
    assert set(pictures) == {"token_ids"}
    picture = pictures["token_ids"]
    check_layout(picture, columns=3)
    palette = id_colours(np.arange(16), 16)
    for b in range(ROWS):
        assert np.array_equal(panel(picture, b, 0), pixels[b])
        assert np.array_equal(panel(picture, b, 1), cells(palette[codes[b].reshape(GRID, GRID)]))
        shown = np.where(mask[b].numpy()[:, None], palette[every[b]], np.array(EMPTY_COLOUR, np.uint8))
        assert np.array_equal(panel(picture, b, 2), cells(shown.reshape(GRID, GRID, 3)))
    assert len(np.unique(codes[:ROWS])) > 1  # the test sees more than one code


# --- CCViT ----------------------------------------------------------------------------------------


def test_ccvit_centroid_ids_rebuilt_image_and_usage_by_brute_force() -> None:
    k, dim = 12, PATCH * PATCH * 3
    pixels = uint8_images(BATCH, 9)
    # Centroids: noisy copies of some of the images' own patches, so several are used.
    rng = np.random.default_rng(10)
    patches = np.stack([block(pixels[b], i).reshape(-1) for b in range(ROWS) for i in range(N)]) / 255.0
    centroids = patches[rng.choice(len(patches), k, replace=False)] + 0.05 * rng.standard_normal((k, dim))
    centroids = np.clip(centroids, 0, 1).astype(np.float32)
    torch.manual_seed(11)
    cfg = CCViTConfig(num_centroids=k, kmeans_samples=64, mask_ratio=0.375, replace_ratio=0.25)
    context = replace(CONTEXT, inputs={"centroids": torch.from_numpy(centroids)})
    model = CCViT(cfg, build_backbone(MODEL), context).eval()
    x = normalised(pixels)
    with torch.no_grad():
        pictures = model.pictures({"views": [x], "mask": random_masks(BATCH, 12, 0.375)})
    assert set(pictures) == {"centroid_ids", "centroid_usage"}
    picture = pictures["centroid_ids"]
    check_layout(picture, columns=3)
    palette = id_colours(np.arange(k), k)
    all_codes = []
    for b in range(ROWS):
        real = x[b].permute(1, 2, 0).double().numpy() * np.array(STD) + np.array(MEAN)  # (H, W, 3) in [0, 1]
        codes = np.array([((centroids - block(real, i).reshape(-1)) ** 2).sum(1).argmin() for i in range(N)])
        all_codes.append(codes)
        assert np.array_equal(panel(picture, b, 0), pixels[b])
        assert np.array_equal(panel(picture, b, 1), cells(palette[codes.reshape(GRID, GRID)]))
        rebuilt = panel(picture, b, 2)
        for i in range(N):
            assert np.array_equal(block(rebuilt, i), to_pixels_u8(centroids[codes[i]].reshape(PATCH, PATCH, 3)))
    counts = np.bincount(np.concatenate(all_codes), minlength=k)  # the 8 pictured images only
    assert counts.sum() == ROWS * N and (counts > 0).sum() > 3
    assert np.array_equal(pictures["centroid_usage"], usage_histogram(counts, "centroids"))
    # Before the centroids are built there is nothing to draw.
    empty = CCViT(cfg, build_backbone(MODEL), CONTEXT).eval()
    assert empty.pictures({"views": [x], "mask": random_masks(BATCH, 12, 0.375)}) == {}


# --- VQ-KD ---------------------------------------------------------------------------------------


def test_vqkd_code_ids_and_codebook_usage_by_brute_force() -> None:
    torch.manual_seed(13)
    teacher = Teacher(timm.create_model(ARCH, num_classes=0, **TINY))
    cfg = VQKDConfig(num_codes=16, code_dim=8, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    model = VQKD(cfg, build_backbone(MODEL), replace(CONTEXT, inputs={"teacher": teacher}))
    pixels = uint8_images(BATCH, 14)
    x = normalised(pixels)
    model({"views": [x]})  # one training forward: k-means init of the codebook
    model.eval()
    codebook = model.quantizer.codebook.clone()
    with torch.no_grad():
        pictures = model.pictures({"views": [x]})
        codes = nearest_codes(model.backbone.vit, model.encode_head, codebook, x)[:ROWS]
    assert torch.equal(model.quantizer.codebook, codebook)  # drawing never updates the codebook
    assert set(pictures) == {"code_ids", "codebook_usage"}
    picture = pictures["code_ids"]
    check_layout(picture, columns=2)
    palette = id_colours(np.arange(16), 16)
    for b in range(ROWS):
        assert np.array_equal(panel(picture, b, 0), pixels[b])
        assert np.array_equal(panel(picture, b, 1), cells(palette[codes[b].reshape(GRID, GRID)]))
    counts = np.bincount(codes.ravel(), minlength=16)
    assert (counts > 0).sum() > 3
    assert np.array_equal(pictures["codebook_usage"], usage_histogram(counts, "codes"))


# --- SemAIM -----------------------------------------------------------------------------------------


def test_semaim_order_heat_map_follows_the_ranks_of_the_semantic_order() -> None:
    torch.manual_seed(15)
    model = SemAIM(SemAIMConfig(), build_backbone(MODEL), CONTEXT).eval()
    pixels = uint8_images(BATCH, 16)
    x = normalised(pixels)
    torch.manual_seed(17)
    with torch.no_grad():
        pictures = model.pictures({"views": [x]})
        tokens = model.backbone.vit.forward_features(x[:ROWS])  # eval-mode unmasked encoder: (B, 1 + N, D)
    torch.manual_seed(17)
    noise = torch.rand(ROWS, N) * model.cfg.order_noise  # the tie-break the order draws
    assert set(pictures) == {"semantic_order"}
    picture = pictures["semantic_order"]
    check_layout(picture, columns=2)
    ramp = colour_ramp()
    for b in range(ROWS):
        assert np.array_equal(panel(picture, b, 0), pixels[b])
        cos = [float(F.cosine_similarity(tokens[b, 0], tokens[b, 1 + i], dim=0)) for i in range(N)]
        centre = max(range(N), key=lambda i: cos[i])
        keys = [math.dist(divmod(i, GRID), divmod(centre, GRID)) + float(noise[b, i]) for i in range(N)]
        ranks = [sum(keys[j] < keys[i] for j in range(N)) for i in range(N)]  # position in the order
        heat = panel(picture, b, 1)
        colours = np.stack([block(heat, i)[0, 0] for i in range(N)])  # (N, 3)
        assert all((block(heat, i) == colours[i]).all() for i in range(N))  # one colour per patch
        assert np.array_equal(colours[centre], ramp[0])  # generated first: darkest
        assert np.array_equal(colours[ranks.index(N - 1)], ramp[-1])  # generated last: brightest
        # Brightness rises with the rank: sorting by it gives the order itself.
        assert np.argsort(luminance(colours), kind="stable").tolist() == np.argsort(ranks).tolist()


# --- ZeRO-3, two ranks: pictures run outside the root's forward, on partitioned parameters -----------


def _zero3_worker(rank: int, out_dir: str) -> None:
    import pretrain.engine
    from pretrain.config import DeepSpeedConfig, OptimConfig, TrainerConfig

    base_config = pretrain.engine.deepspeed_config

    def partition_everything(ds: DeepSpeedConfig, trainer: TrainerConfig) -> dict:
        # Tiny parameters are normally kept whole (persistence threshold 1e5 elements); a ViT-B
        # pos_embed (151k) is not. Partition all, as at scale.
        config = base_config(ds, trainer)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return config

    pretrain.engine.deepspeed_config = partition_everything
    mae = small_mae(True).train()
    engine = pretrain.engine.build_engine(
        mae,
        OptimConfig(lr=1e-3),
        TrainerConfig(batch_size=4, num_workers=2, max_steps=4),
        DeepSpeedConfig(zero_stage=3, precision="bf16", force_precision=True),  # also where bf16 is emulated
    )
    assert engine.module.mask_token.numel() == 0 and engine.module.backbone.vit.pos_embed.numel() == 0
    pixels = uint8_images(4, 20 + rank)  # each rank its own images
    batch = {"views": [normalised(pixels).bfloat16()], "mask": random_masks(4, 30 + rank)}
    engine.backward(engine(batch).loss)
    engine.step()
    engine.module.eval()
    with torch.no_grad():
        picture = engine.module.pictures(batch)["mae_reconstruction"]
    engine.module.train()
    engine.backward(engine(batch).loss)  # training goes on afterwards
    engine.step()
    expected = to_uint8_images(batch["views"][0], MEAN, STD)
    saved = {"picture": torch.from_numpy(picture), "expected": torch.from_numpy(expected), "mask": batch["mask"]}
    torch.save(saved, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow  # DeepSpeed may JIT-build its CPU shm op first (minutes on 2 cores)
def test_mae_pictures_under_zero3_bf16_on_two_ranks(tmp_path, gloo_ranks) -> None:
    gloo_ranks(_zero3_worker, 2, str(tmp_path), timeout=900)
    for rank in range(2):
        saved = {k: v.numpy() for k, v in torch.load(tmp_path / f"rank{rank}.pt", weights_only=True).items()}
        picture, mask = saved["picture"], saved["mask"]
        assert picture.shape == (PAD + 4 * (SIZE * SCALE + PAD), PAD + 3 * (SIZE * SCALE + PAD), 3)
        for b in range(4):
            assert np.array_equal(panel(picture, b, 0), saved["expected"][b])  # the rank's own bf16 images
            masked = panel(picture, b, 1)
            assert [bool((block(masked, i) == MASK_GREY).all()) for i in range(N)] == mask[b].tolist()
