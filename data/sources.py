"""Where the shard writer's samples come from: `open_source("SPEC")` -> a stream of WebDataset samples.

SPEC kinds (what `python -m data.write SOURCE ...` accepts):

    path/to/folder        images; class sub-folders -> `.cls` = index of the folder name in
                          sorted order; images directly in the folder (no sub-folders) -> no labels
    @list.txt             one image path or fsspec URL per line (relative paths: from the list's
                          folder; blank lines and `#` comments skipped); no labels
    sklearn:digits        scikit-learn's bundled 8x8 handwritten digits (1797 images), upscaled 4x
                          to 32x32, grey -> RGB PNG, `.cls` = the digit
    synthetic:N[:SEED]    N procedural shapes (data.synthetic, seed 0 by default), `.cls` = class
    URL.manifest.json     re-shard a written dataset: every sample, keys and all fields kept
    URL-{000..009}.tar    the same from a brace pattern of shard URLs (or one .tar URL)

Samples are `{"__key__": str, ext: bytes | int, ...}` as `data.shards.write_shards` takes them.
Every spec is checked when opened (`SourceError` names the bad value and the valid kinds),
so a typo fails before anything is written.
"""

from __future__ import annotations

import io
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from data.decode import IMAGE_EXTENSIONS
from data.shards import ERROR_FIELD, KEY_FIELD, URL_FIELD, iter_shard

logger = logging.getLogger(__name__)

SOURCE_KINDS = (
    "an image folder path",
    "@list.txt",
    "sklearn:digits",
    "synthetic:N[:SEED]",
    "a *.manifest.json URL",
    "a brace pattern of .tar URLs",
)
DIGITS_SCALE = 4  # 8x8 -> 32x32, nearest neighbour: each digit pixel becomes a 4x4 block
DIGITS_MAX = 16  # sklearn's digits are counts 0..16 of set pixels in a 4x4 block of the scan


class SourceError(ValueError):
    """A SOURCE spec that names no valid source (unknown kind, missing path, empty folder)."""


def _bad(message: str) -> SourceError:
    return SourceError(f"{message}; valid sources: {', '.join(SOURCE_KINDS)}")


@dataclass
class Source:
    """An opened source: what it is, and a fresh iterator over its samples per call.

    Sources of separate files (a folder, a file list) and sklearn's digits also read sample i
    on its own (`read`): those can be written in any order and read by several threads.
    """

    description: str
    iterate: Callable[[], Iterator[dict[str, Any]]]
    class_names: list[str] = field(default_factory=list)  # label i = class_names[i]; empty if unlabelled
    shard_urls: list[str] = field(default_factory=list)  # the shards read, when re-sharding
    count: int | None = None  # how many samples, where known before reading (progress)
    read: Callable[[int], dict[str, Any]] | None = None  # sample i of count (random access), if possible
    # Shuffled unless asked otherwise: folders and file lists, which list images class by class
    # (or in whatever order they were collected).
    shuffle_default: bool = False

    def samples(self, order: Sequence[int] | None = None, workers: int = 1) -> Iterator[dict[str, Any]]:
        """All samples, in `order` (indices; needs `read`) or the source's own, read by `workers` threads."""
        if self.read is None:
            if order is not None:
                raise SourceError(f"{self.description} is read as a stream: it cannot be written in another order")
            return self.iterate()
        indices = range(self.count or 0) if order is None else order
        return ordered_map(self.read, indices, workers)


def shuffled_order(count: int, seed: int) -> list[int]:
    """A seeded permutation of range(count): the same seed writes the same shards."""
    return [int(i) for i in np.random.default_rng(seed).permutation(count)]


def ordered_map(fn: Callable[[int], dict[str, Any]], indices: Iterable[int], workers: int) -> Iterator[dict[str, Any]]:
    """fn over indices, in their order, on `workers` threads with at most 4 x workers reads ahead.

    Threads suit the work: reading files and object-store GETs wait on I/O, not the interpreter.
    """
    if workers <= 1:
        yield from (fn(i) for i in indices)
        return
    pending: deque[Future[dict[str, Any]]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="read") as pool:
        try:
            for i in indices:
                pending.append(pool.submit(fn, i))
                if len(pending) >= 4 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # stopped early (an error, --limit): no reads left running
                future.cancel()


def image_ext(path: str) -> str:
    """The WebDataset field for an image file: its lowercased suffix, if the pipeline decodes it."""
    ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if ext not in IMAGE_EXTENSIONS:
        raise _bad(f"{path!r} is not an image file (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return ext


def _read(url: str, storage_options: dict[str, Any]) -> bytes:
    with fsspec.open(url, "rb", **storage_options) as f:
        return f.read()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def digits_image(pixels: np.ndarray) -> Image.Image:
    """One sklearn digit (8, 8) of 0..16 -> an RGB image (32, 32) of round(v * 255 / 16)."""
    grey = np.rint(pixels * (255 / DIGITS_MAX)).astype(np.uint8)  # (8, 8)
    big = np.kron(grey, np.ones((DIGITS_SCALE, DIGITS_SCALE), dtype=np.uint8))  # (32, 32)
    return Image.fromarray(np.stack([big] * 3, axis=-1), mode="RGB")  # (32, 32, 3)


def _digits() -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()

    def read(index: int) -> dict[str, Any]:
        return {
            "__key__": f"digits-{index:05d}",
            "png": _png(digits_image(digits.images[index])),
            "cls": int(digits.target[index]),
        }

    count = len(digits.target)
    names = [str(d) for d in range(10)]
    return Source(f"sklearn digits ({count} images)", lambda: map(read, range(count)), names, count=count, read=read)


def _synthetic(spec: str, arg: str) -> Source:
    from data.default import synthetic_samples
    from data.synthetic import CLASS_NAMES

    match = re.fullmatch(r"(\d+)(?::(\d+))?", arg)
    if match is None or int(match.group(1)) < 1:
        raise _bad(f"bad synthetic source {spec!r}: write synthetic:N or synthetic:N:SEED with N >= 1")
    num, seed = int(match.group(1)), int(match.group(2) or 0)
    return Source(
        f"synthetic shapes ({num} images, seed {seed})",
        lambda: synthetic_samples("synthetic", num, seed),
        list(CLASS_NAMES),
        count=num,
    )


def _folder(root: Path) -> Source:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def images(folder: Path) -> list[Path]:
        found = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS]
        return [p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts)]

    if class_dirs:
        files = [(path, label) for label, d in enumerate(class_dirs) for path in images(d)]
        names = [d.name for d in class_dirs]
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS]
        if loose:
            logger.warning("%s: %d images outside the class folders are not written", root, len(loose))
    else:
        files, names = [(path, None) for path in images(root)], []
    if not files:
        raise _bad(f"image folder {str(root)!r} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")

    def read(index: int) -> dict[str, Any]:
        # The key is the image's place in the sorted listing: the same file, the same key, in any order.
        path, label = files[index]
        sample: dict[str, Any] = {"__key__": f"img-{index:08d}", image_ext(path.name): path.read_bytes()}
        if label is not None:
            sample["cls"] = label
        return sample

    kind = f"{len(names)} classes" if names else "no labels"
    return Source(
        f"image folder {root} ({len(files)} images, {kind})",
        lambda: map(read, range(len(files))),
        names,
        count=len(files),
        read=read,
        shuffle_default=True,
    )


def _file_list(spec: str, storage_options: dict[str, Any]) -> Source:
    list_url = spec[1:]
    try:
        text = _read(list_url, storage_options).decode()
    except FileNotFoundError:
        raise _bad(f"file list {list_url!r} (from {spec!r}) does not exist") from None
    base = list_url.rsplit("/", 1)[0] if "/" in list_url else "."
    urls = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        absolute = "://" in entry or entry.startswith("/")
        urls.append(entry if absolute else f"{base}/{entry}")
    if not urls:
        raise _bad(f"file list {list_url!r} names no images")
    exts = [image_ext(url) for url in urls]  # checked now, not halfway through the write

    def read(index: int) -> dict[str, Any]:
        url = urls[index]
        try:
            data = _read(url, storage_options)
        except FileNotFoundError:
            raise FileNotFoundError(f"image #{index + 1} of {list_url!r}, {url!r}, does not exist") from None
        return {"__key__": f"img-{index:08d}", exts[index]: data}

    return Source(
        f"file list {list_url} ({len(urls)} images, no labels)",
        lambda: map(read, range(len(urls))),
        count=len(urls),
        read=read,
        shuffle_default=True,
    )


def _shards(spec: str, storage_options: dict[str, Any]) -> Source:
    from data.stream import resolve_urls

    try:
        urls = resolve_urls(spec, storage_options)  # a manifest is read and verified here
    except FileNotFoundError as e:
        raise _bad(str(e)) from None
    if not spec.endswith(".json"):
        missing = [url for url in urls if not _exists(url, storage_options)]
        if missing:
            raise _bad(f"{len(missing)} of {len(urls)} shards of {spec!r} do not exist, e.g. {missing[0]!r}")

    def iterate() -> Iterator[dict[str, Any]]:
        damaged = 0
        for url in urls:
            for sample in iter_shard(url, storage_options):
                if ERROR_FIELD in sample:  # a truncated/empty/non-tar shard ends with one marker
                    damaged += 1
                    logger.warning("not copying sample %r of %s: %s", sample[KEY_FIELD], url, sample[ERROR_FIELD])
                    continue
                del sample[URL_FIELD]  # where it was read from; the new shard is its home now
                yield sample
        if damaged:
            logger.warning("re-sharding left out %d damaged sample(s); the warnings above name them", damaged)

    return Source(f"{len(urls)} shards of {spec}", iterate, shard_urls=urls)


def _exists(url: str, storage_options: dict[str, Any]) -> bool:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return bool(fs.exists(path))


def open_source(spec: str, storage_options: dict[str, Any] | None = None) -> Source:
    """Check `spec` and return its source (see the module docstring for the kinds)."""
    options = dict(storage_options or {})
    spec = spec.strip()
    if not spec:
        raise _bad("empty source")
    if spec.startswith("@"):
        return _file_list(spec, options)
    if spec.endswith(".json") or ".tar" in spec:
        return _shards(spec, options)
    kind, colon, arg = spec.partition(":")
    if colon and kind == "sklearn":
        if arg != "digits":
            raise _bad(f"unknown scikit-learn dataset {spec!r} (only sklearn:digits)")
        return _digits()
    if colon and kind == "synthetic":
        return _synthetic(spec, arg)
    if "://" in spec and not spec.startswith("file://"):
        raise _bad(f"source {spec!r}: remote image folders are not supported; list the images in an @list.txt")
    path = Path(spec.removeprefix("file://"))
    if path.is_dir():
        return _folder(path)
    if path.exists():
        raise _bad(f"source {spec!r} is a file, not a folder")
    if colon and "/" not in kind:
        raise _bad(f"unknown source kind {kind!r} in {spec!r}")
    raise _bad(f"no such folder {spec!r}")
