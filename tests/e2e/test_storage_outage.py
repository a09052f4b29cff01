"""The S3 endpoint goes down for 15 s in the middle of a run: the workers' reads are retried
and the run completes with every sample (none lost, none skipped).

The outage is real: the run reads its shards through a TCP proxy in front of the moto
endpoint, and the proxy is closed (live connections reset, new ones refused) once part
of the data has passed, then reopened 15 s later.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

from data.write import main as write_main
from pretrain.run import main

pytestmark = pytest.mark.slow

SAMPLES, SHARD_SIZE = 128, 8  # 16 shards, 8 per rank (2 workers x 1 loader worker)
STEPS, BATCH, WORKERS = 12, 8, 2  # 192 samples read: 1.5 epochs
OUTAGE_S = 15.0


def test_endpoint_down_15s_mid_run_is_retried_and_the_run_completes(
    ray_local: None, runs, s3_endpoint: Any, s3_proxy: Any, tmp_path: Path
) -> None:
    out = f"s3://{s3_endpoint.bucket}/outage-{uuid.uuid4().hex[:8]}"
    direct = json.dumps(s3_endpoint.storage_options)
    assert write_main([f"synthetic:{SAMPLES}", out, "--shard-size", str(SHARD_SIZE), "--storage-options", direct]) == 0
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_endpoint.storage_options)
    epoch_bytes = fs.du(out.removeprefix("s3://"))

    # The workers read through the proxy, with botocore's and s3fs's default retries (what a
    # user gets); a small shuffle buffer keeps reading spread over the run.
    through = [
        f"+data.storage_options.client_kwargs.endpoint_url={s3_proxy.url}",
        f"+data.storage_options.key={s3_endpoint.env['AWS_ACCESS_KEY_ID']}",
        f"+data.storage_options.secret={s3_endpoint.env['AWS_SECRET_ACCESS_KEY']}",
    ]
    events: dict[str, float] = {}

    def outage() -> None:
        # Down once a third of an epoch has reached the workers: after start-up, well before the end.
        while s3_proxy.downstream_bytes < epoch_bytes / 3:
            if time.monotonic() - start > 300:
                return
            time.sleep(0.01)
        events["down"] = time.monotonic()
        events["bytes_at_down"] = s3_proxy.downstream_bytes
        s3_proxy.stop()
        time.sleep(OUTAGE_S)
        events["bytes_in_outage"] = s3_proxy.downstream_bytes - events["bytes_at_down"]
        s3_proxy.start()
        events["up"] = time.monotonic()

    start = time.monotonic()
    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    rc = main(
        [
            *runs.tiny,
            f"data.urls={out}/train.manifest.json",
            *through,
            "data.shuffle_buffer=4",
            f"trainer.max_steps={STEPS}",
            f"trainer.checkpoint_every={STEPS}",
            "trainer.log_every=1",
            "trainer.max_failures=0",  # completed by retrying reads, not by restarting the group
            "eval.enabled=false",
            f"trainer.storage_path={tmp_path}",
            "name=outage",
        ]
    )
    finished = time.monotonic()
    thread.join(timeout=OUTAGE_S + 10)
    assert rc == 0
    assert "down" in events and "up" in events, "the run read less than a third of an epoch"
    # The outage fell inside the run, and nothing reached the workers while it lasted.
    assert events["up"] < finished and events["bytes_in_outage"] == 0
    assert s3_proxy.downstream_bytes > events["bytes_at_down"]  # reading went on afterwards

    record = runs.record(tmp_path, "outage")
    assert [s for s, _ in runs.history(record, "loss")] == list(range(1, STEPS + 1))
    assert runs.history(record, "data/samples")[-1] == (STEPS, float(STEPS * BATCH * WORKERS))
    assert runs.history(record, "data/skipped")[-1] == (STEPS, 0.0)
    retries = runs.history(record, "data/io_retries")
    assert retries[-1][1] >= 1, retries  # the reads were retried, and counted

    from mlflow.tracking import MlflowClient

    run = MlflowClient(record["tracking_uri"]).get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # Both halves of the credentials given as storage options are redacted in the params.
    assert run.data.params["data.storage_options.key"] == run.data.params["data.storage_options.secret"] == "***"
