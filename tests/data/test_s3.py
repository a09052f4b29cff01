"""Shards on a real S3 HTTP endpoint (moto on 127.0.0.1, started by scripts/s3_endpoint.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import fsspec
import pytest

from data.config import DataConfig
from data.manifest import read_manifest
from data.needs import DataNeeds
from data.shards import KEY_FIELD, iter_shard
from data.stream import build_train_loader, resolve_urls

REPO = Path(__file__).resolve().parents[2]
NUM, SHARD_SIZE, BATCH = 64, 8, 8


def test_cli_writes_to_s3_and_the_loader_streams_it_back(s3_endpoint: Any) -> None:
    out = f"s3://{s3_endpoint.bucket}/demo"
    # No --storage-options: the exported AWS_* variables alone must reach the endpoint.
    result = subprocess.run(
        [sys.executable, "-m", "data.write", f"synthetic:{NUM}", out, "--shard-size", str(SHARD_SIZE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    url = f"{out}/train.manifest.json"
    assert f"manifest {url} " in result.stdout

    options = s3_endpoint.storage_options
    # The objects went over HTTP to this endpoint: list them with explicit options, no env involved.
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_endpoint.bucket}/demo"))
    assert names == [f"train-{i:06d}.tar" for i in range(NUM // SHARD_SIZE)] + ["train.manifest.json"]

    urls = resolve_urls(url, options)
    assert urls == read_manifest(url, options).shard_urls() and len(urls) == NUM // SHARD_SIZE
    written = [sample[KEY_FIELD] for u in urls for sample in iter_shard(u, options, keep=())]
    assert written == [f"synthetic-{i:08d}" for i in range(NUM)]

    cfg = DataConfig(urls=url, num_workers=0, storage_options=options, shuffle_buffer=16)
    loader = build_train_loader(
        cfg, DataNeeds(views=1), urls=urls, img_size=32, batch_size=BATCH, rank=0, world_size=1, seed=0
    )
    batches = iter(loader)
    keys: list[str] = []
    for _ in range(NUM // BATCH):  # one epoch: 64 samples, one reader, no tail to drop
        batch = next(batches)
        assert len(batch["views"]) == 1 and tuple(batch["views"][0].shape) == (BATCH, 3, 32, 32)
        keys += batch["__key__"]
    assert loader.epoch == 0 and loader.skipped == 0
    assert sorted(keys) == written  # every written sample exactly once
    assert keys != written  # and shuffled
    next(batches)
    assert loader.epoch == 1
    loader.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_endpoint_script_stops_moto(s3_launcher: Any, sig: int) -> None:
    endpoint = s3_launcher(bucket="other").start()
    try:
        assert endpoint.env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **endpoint.storage_options)
        assert [b.rstrip("/") for b in fs.ls("")] == ["other"]
        assert endpoint.moto_alive()
    finally:
        code = endpoint.stop(sig)
    assert code == 0
    assert not endpoint.moto_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(endpoint.endpoint_url, timeout=2)
