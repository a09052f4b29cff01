"""A corpus with every kind of bad input the reader must survive: converted, or skipped and counted."""

from __future__ import annotations

import io
import logging
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.config import DataConfig
from data.shards import write_shards
from data.stream import ResumableLoader, resolve_urls


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG whose header claims width x height RGB pixels (far past PIL's decompression-bomb limit)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def texture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


@dataclass(frozen=True)
class Corpus:
    urls: list[str]
    good: list[str]  # keys that must come out (converted where needed)
    bad: int  # skip events per epoch: bad samples + one per damaged shard
    lost: list[str]  # keys behind a truncation: unreadable, not counted individually


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    grey16 = Image.fromarray(np.full((24, 40), 40_000, dtype=np.uint16))
    palette = Image.new("P", (30, 20), 1)
    palette.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    palette.info["transparency"] = 0
    converted = {
        "rgb-jpeg": encode(texture(500, 375, 1), "JPEG"),
        "grey-png": encode(texture(40, 30, 2).convert("L"), "PNG"),
        "rgba-png": encode(texture(40, 30, 3).convert("RGBA"), "PNG"),
        "grey16-png": encode(grey16, "PNG"),
        "palette-png": encode(palette, "PNG"),
        "cmyk-jpeg": encode(texture(64, 48, 4).convert("CMYK"), "JPEG"),
        "greya-png": encode(texture(40, 30, 5).convert("LA"), "PNG"),
        "tiny-1x1": encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
    }
    odd = [{"__key__": k, "jpg" if k.endswith("jpeg") else "png": v} for k, v in converted.items()]
    mixed = [
        {"__key__": "huge-jpeg", "jpg": encode(texture(3000, 2000, 6), "JPEG")},
        {"__key__": "bomb", "png": bomb_png()},
        {"__key__": "garbage", "jpg": b"\xff\xd8\xff\xe0 not really a jpeg"},
        {"__key__": "label-only", "cls": 3},
        *({"__key__": f"mixed-{i}", "png": encode(texture(32, 32, 10 + i), "PNG"), "cls": i} for i in range(4)),
    ]
    cut = [{"__key__": f"cut-{i}", "png": encode(texture(32, 32, 20 + i), "PNG"), "cls": i} for i in range(6)]
    write_shards(odd, str(root / "a"), prefix="odd", shard_size=100)
    write_shards(mixed, str(root / "a"), prefix="mixed", shard_size=100)
    write_shards(cut, str(root / "a"), prefix="cut", shard_size=100)
    # Truncate the cut shard in the middle of sample cut-3's image.
    cut_path = root / "a" / "cut-000000.tar"
    with tarfile.open(cut_path) as tar:
        member = tar.getmember("cut-3.png")
    cut_path.write_bytes(cut_path.read_bytes()[: member.offset_data + member.size // 2])
    (root / "a" / "empty-000000.tar").write_bytes(b"")
    (root / "a" / "notatar-000000.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    urls = [str(root / "a" / f"{p}-000000.tar") for p in ("odd", "mixed", "cut", "empty", "notatar")]
    good = [*converted, "huge-jpeg", *(f"mixed-{i}" for i in range(4)), *(f"cut-{i}" for i in range(3))]
    # bomb, garbage, label-only; cut-3 (the damaged sample); the empty shard; the non-tar shard.
    return Corpus(urls, sorted(good), bad=6, lost=["cut-4", "cut-5"])


def loader_for(corpus: Corpus, num_workers: int, **cfg: object) -> ResumableLoader:
    return ResumableLoader(
        corpus.urls,
        cfg=DataConfig(num_workers=num_workers, shuffle_buffer=4, **cfg),
        views=2,
        img_size=32,
        batch_size=4,
        rank=0,
        world_size=1,
        seed=0,
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_bad_case_is_converted_or_skipped_and_counted(
    corpus: Corpus, num_workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    loader = loader_for(corpus, num_workers)
    seen: list[tuple[int, str]] = []
    with caplog.at_level(logging.WARNING, logger="data.reader"):
        for batch in loader:
            for view in batch["views"]:
                assert view.shape == (4, 3, 32, 32) and bool(view.isfinite().all())
            seen += list(zip(batch["__epoch__"], batch["__key__"], strict=True))
            if loader.epoch >= 2:
                break
    loader.close()
    for epoch in (0, 1):
        keys = Counter(k for e, k in seen if e == epoch)
        assert sorted(keys) == corpus.good and set(keys.values()) == {1}, f"epoch {epoch}"
        assert loader.skipped_per_epoch[epoch] == corpus.bad, f"epoch {epoch}"
    assert not {k for _, k in seen} & set(corpus.lost)
    if num_workers == 0:  # worker processes log to their own handlers
        messages = "\n".join(r.getMessage() for r in caplog.records)
        for key, shard in [("'bomb'", "mixed-"), ("'garbage'", "mixed-"), ("'label-only'", "mixed-")]:
            assert any(key in line and shard in line for line in messages.splitlines()), key
        assert "cut-000000.tar" in messages and "empty-000000.tar" in messages and "notatar-000000.tar" in messages


def test_corpus_past_the_skipped_fraction_aborts(corpus: Corpus) -> None:
    # 6 skip events per 15 good samples: 29% of what is read.
    loader = loader_for(corpus, 0, max_skipped_fraction=0.25)
    loader.abort_min_samples = 20
    with pytest.raises(RuntimeError, match=r"samples read were bad \(\d+\.\d% > data.max_skipped_fraction=0.25\)"):
        for _ in loader:
            pass


def test_brace_pattern_reads_the_corpus(corpus: Corpus) -> None:
    folder = Path(corpus.urls[0]).parent
    assert resolve_urls(f"{folder}/{{odd,mixed,cut,empty,notatar}}-000000.tar") == corpus.urls
