"""The shard writer CLI: any image source -> WebDataset shards + manifest on any fsspec URL.

    python -m data.write SOURCE OUT_URL [--shard-size 512] [--shard-bytes B] [--prefix train] [--limit N]
                         [--no-shuffle] [--seed 0] [--workers 8] [--storage-options JSON]

    python -m data.write sklearn:digits /data/digits --shard-size 256
    python -m data.write ~/images/train s3://pretrain/imgs --prefix train   # class sub-folders -> .cls
    python -m data.write @files.txt file:///data/unlabelled
    python -m data.write synthetic:4096 s3://pretrain/demo
    python -m data.write s3://pretrain/demo/train.manifest.json /data/resharded --shard-size 64

Folders and file lists are written in a seeded random order (`--seed`; `--no-shuffle` keeps
the listing's order): a folder lists its images class by class, and the loader's shuffle
buffer (512 samples) alone would give batches of one or two classes. `--shuffle` asks for
the same with sklearn's digits; shard sources are streamed in their order. Images are read
by `--workers` threads (files and object-store GETs wait on I/O); the samples' keys are
their place in the source's listing, whatever the order written. Progress: a bar with
images/s on a terminal, a line every 10 s otherwise.

SOURCE kinds are listed in `data.sources`. OUT_URL gets `{prefix}-NNNNNN.tar` shards and
`{prefix}.manifest.json` (`data.shards.write_shards`); give the manifest URL to `data.urls`.
S3 endpoints and credentials come from the usual AWS_* variables (scripts/s3_endpoint.py
prints them for a local endpoint), or from --storage-options, which is passed to fsspec for
both the source and OUT_URL. The last output line is the summary: shards, samples, bytes,
manifest URL and manifest hash.
Exit codes: 0 written; 2 bad arguments or SOURCE; 1 the write failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from typing import Any

from data.progress import Progress
from data.shards import ShardReadError, write_shards
from data.sources import SOURCE_KINDS, SourceError, open_source, shuffled_order

logger = logging.getLogger("data.write")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.write",
        description="Write WebDataset tar shards and a manifest from an image source.",
    )
    parser.add_argument("source", help=f"what to write: {'; '.join(SOURCE_KINDS)}")
    parser.add_argument("out_url", help="output folder: a local path, file://..., s3://bucket/prefix, ...")
    parser.add_argument("--shard-size", type=int, default=512, help="samples per shard (default 512)")
    parser.add_argument(
        "--shard-bytes",
        type=int,
        default=None,
        help="also cut a shard before it would exceed B bytes (a larger single sample gets its own shard)",
    )
    parser.add_argument("--prefix", default="train", help="shard/manifest name prefix (default train)")
    parser.add_argument(
        "--limit", type=int, default=None, help="write only the first N samples (of the shuffled order, if shuffled)"
    )
    parser.add_argument(
        "--shuffle",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write in a seeded random order (default: on for folders and file lists, off otherwise)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order (default 0)")
    parser.add_argument("--workers", type=int, default=8, help="threads reading the source's images (default 8)")
    parser.add_argument(
        "--storage-options",
        default="{}",
        help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'',
    )
    return parser


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _output_url(out_url: str) -> str:
    """Local paths made absolute, so the printed manifest URL works from any directory."""
    if "://" in out_url or "::" in out_url:
        return out_url
    return os.path.abspath(os.path.expanduser(out_url))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("botocore", "aiobotocore", "s3fs"):  # credential/endpoint discovery chatter at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.shard_size < 1:
        return _error(f"--shard-size must be >= 1, got {args.shard_size}", 2)
    if args.shard_bytes is not None and args.shard_bytes < 10240:
        return _error(f"--shard-bytes must be >= 10240 (one tar record), got {args.shard_bytes}", 2)
    if args.limit is not None and args.limit < 1:
        return _error(f"--limit must be >= 1, got {args.limit}", 2)
    if args.workers < 1:
        return _error(f"--workers must be >= 1, got {args.workers}", 2)
    try:
        storage_options: Any = json.loads(args.storage_options)
    except json.JSONDecodeError as e:
        # The value is not echoed: it usually holds credentials.
        return _error(f"--storage-options is not JSON ({e}); value not shown, it may hold credentials", 2)
    if not isinstance(storage_options, dict):
        return _error(f"--storage-options must be a JSON object, got a JSON {type(storage_options).__name__}", 2)

    try:
        source = open_source(args.source, storage_options)
    except (SourceError, ValueError) as e:  # resolve_urls raises ValueError for bad URL schemes
        return _error(str(e), 2)
    logger.info("source: %s", source.description)
    if source.class_names:
        logger.info("class mapping (cls -> name): %s", dict(enumerate(source.class_names)))
    shuffle = source.shuffle_default if args.shuffle is None else args.shuffle
    if shuffle and source.read is None:
        return _error(f"--shuffle: {source.description} is read as a stream, in its own order; drop --shuffle", 2)
    order = shuffled_order(source.count or 0, args.seed) if shuffle else None
    logger.info("order: %s", f"shuffled (seed {args.seed})" if shuffle else "the source's own")
    samples = source.samples(order, workers=args.workers)
    if args.limit is not None:
        samples = itertools.islice(samples, args.limit)

    out_url = _output_url(args.out_url)
    # Re-sharding onto its own shard names would overwrite shards before they are read.
    clobbered = [
        url for url in source.shard_urls if _output_url(url).startswith(f"{out_url.rstrip('/')}/{args.prefix}-")
    ]
    if clobbered:
        return _error(
            f"{args.source!r} would be overwritten while being read: {clobbered[0]!r} has the output's "
            f"name; write to another folder or use another --prefix",
            2,
        )
    total = source.count if args.limit is None or source.count is None else min(args.limit, source.count)
    try:
        with Progress(f"writing {out_url}", total=total, unit="img", logger=logger) as progress:
            manifest = write_shards(
                samples,
                out_url,
                prefix=args.prefix,
                shard_size=args.shard_size,
                shard_bytes=args.shard_bytes,
                storage_options=storage_options,
                progress=progress,
            )
    except (ValueError, TypeError, OSError, ShardReadError) as e:
        return _error(f"writing {args.source!r} to {out_url!r} failed: {e}", 1)
    total_bytes = sum(s.bytes for s in manifest.shards)
    print(
        f"wrote {len(manifest.shards)} shards, {manifest.total_samples} samples, {total_bytes} bytes; "
        f"manifest {manifest.url} (hash {manifest.manifest_hash})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
