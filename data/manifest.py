"""The shard manifest: which shards make a dataset, and a content hash for lineage.

A writer run of `data.shards.write_shards(..., out_url, prefix=P)` leaves, in
`out_url`, the shards `P-000000.tar, P-000001.tar, ...` and `P.manifest.json`:

    {
      "format": "webdataset-manifest",
      "version": 1,
      "prefix": "train",
      "total_samples": 4096,
      "extensions": ["cls", "png"],            # member suffixes seen, sorted
      "shards": [
        {"name": "train-000000.tar",           # relative to the manifest's folder
         "num_samples": 512, "bytes": 2621440,
         "sha256": "<hex of the shard file's bytes>"},
        ...
      ],
      "manifest_hash": "<sha256 hex of the canonical JSON of every other field>"
    }

Canonical JSON = `json.dumps(fields, sort_keys=True, separators=(",", ":"))`.
Shards are written byte-reproducibly, so the same samples give the same
`manifest_hash` on any machine; that hash is what a run records as its data lineage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import fsspec

from data.retry import Backoff, is_transient

MANIFEST_FORMAT = "webdataset-manifest"
MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    """One shard file as the writer left it."""

    name: str  # file name, relative to the manifest's folder
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A dataset: its shards, their sizes and hashes, and the hash of it all."""

    prefix: str
    shards: tuple[ShardInfo, ...]
    extensions: tuple[str, ...]
    manifest_hash: str
    # Where the manifest lives; shard names resolve against its folder. Not hashed,
    # so a copied dataset keeps its hash.
    url: str = field(default="", compare=False)

    @property
    def total_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def shard_urls(self) -> list[str]:
        """Absolute URLs of the shards, in manifest order."""
        if not self.url:
            raise ValueError("manifest has no url to resolve shard names against; read it with read_manifest")
        base = self.url.rsplit("/", 1)[0]
        return [f"{base}/{s.name}" for s in self.shards]


def _content(prefix: str, shards: tuple[ShardInfo, ...], extensions: tuple[str, ...]) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "prefix": prefix,
        "total_samples": sum(s.num_samples for s in shards),
        "extensions": list(extensions),
        "shards": [
            {"name": s.name, "num_samples": s.num_samples, "bytes": s.bytes, "sha256": s.sha256} for s in shards
        ],
    }


def content_hash(content: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of `content` (the manifest without its hash)."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def make_manifest(prefix: str, shards: list[ShardInfo], extensions: set[str], url: str = "") -> Manifest:
    """Build a manifest and compute its hash."""
    shard_tuple, ext_tuple = tuple(shards), tuple(sorted(extensions))
    digest = content_hash(_content(prefix, shard_tuple, ext_tuple))
    return Manifest(prefix=prefix, shards=shard_tuple, extensions=ext_tuple, manifest_hash=digest, url=url)


def manifest_to_json(manifest: Manifest) -> str:
    """The manifest file's text."""
    content = _content(manifest.prefix, manifest.shards, manifest.extensions)
    content["manifest_hash"] = manifest.manifest_hash
    return json.dumps(content, indent=2, sort_keys=True) + "\n"


def read_manifest(
    url: str, storage_options: dict[str, Any] | None = None, *, retries: int = 6, retry_wait_s: float = 0.5
) -> Manifest:
    """Read and verify a manifest written by `data.shards.write_shards`.

    Transient storage errors are retried as in `data.shards.iter_shard` (up to
    `retries` times, waiting `retry_wait_s` doubling up to 30 s), then OSError.
    """
    backoff = Backoff(f"manifest {url}", retries, retry_wait_s)
    while True:
        try:
            with fsspec.open(url, "rt", **(storage_options or {})) as f:
                raw = json.load(f)
            break
        except FileNotFoundError:
            raise FileNotFoundError(f"no manifest at {url!r}; write one with `python -m data.write`") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {url!r} is not valid JSON ({e})") from None
        except Exception as e:
            if not is_transient(e):
                raise
            if not backoff.wait(e):
                raise OSError(backoff.give_up_message(e)) from e
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{url!r} is not a shard manifest (expected format={MANIFEST_FORMAT!r})")
    if raw.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"manifest {url!r} has version {raw.get('version')!r}; this code reads version {MANIFEST_VERSION}"
        )
    try:
        shards = tuple(
            ShardInfo(
                name=str(s["name"]), num_samples=int(s["num_samples"]), bytes=int(s["bytes"]), sha256=str(s["sha256"])
            )
            for s in raw["shards"]
        )
        manifest = make_manifest(str(raw["prefix"]), list(shards), set(raw["extensions"]), url=url)
        recorded = str(raw["manifest_hash"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"manifest {url!r} is malformed: missing or bad field ({e!r})") from None
    if recorded != manifest.manifest_hash:
        raise ValueError(
            f"manifest {url!r} is corrupt or was edited: manifest_hash {recorded[:12]}... does not match its "
            f"content ({manifest.manifest_hash[:12]}...); rewrite it with data.shards.write_shards"
        )
    if int(raw["total_samples"]) != manifest.total_samples:
        raise ValueError(f"manifest {url!r}: total_samples {raw['total_samples']} != sum over shards")
    return manifest
