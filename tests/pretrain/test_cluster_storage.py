"""A driver attached to a multi-node Ray cluster refuses node-local checkpoints and tracking store
before it writes anything; on one node it warns. The cluster is Ray's own test cluster (two raylets
on this machine), in a subprocess of its own: the session's local Ray instances stay untouched."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pretrain.config import RAY_JOB_ENV

SCRIPT = textwrap.dedent(
    """
    import logging, os, subprocess, sys
    import ray
    from ray.cluster_utils import Cluster

    from pretrain.compose import load_config
    from omegaconf import OmegaConf
    from pretrain.launch import cluster_storage_problems

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=cluster.address)
        cfg = OmegaConf.to_object(load_config([]))
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        print("one node:", cluster_storage_problems(cfg), flush=True)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.shutdown()
        # The user's command, attached to the two-node cluster (as on a cluster's head node).
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        done = subprocess.run(
            [sys.executable, "-m", "pretrain.run", "trainer.max_steps=1", "name=two"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        print("rc", done.returncode, flush=True)
        sys.stderr.write(done.stderr)
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def test_two_nodes_refuse_node_local_storage_one_node_warns(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PRETRAIN_STORAGE_PATH", "MLFLOW_TRACKING_URI")}
    env.pop(RAY_JOB_ENV, None)
    env["RAY_AUTH_MODE"] = "token"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # One node: nothing refused, a warning per setting (it works until the cluster grows).
    assert "one node: []" in done.stdout
    assert "WARNING trainer.storage_path: ./runs (the default) is on one node's disk on this one-node Ray cluster" in (
        done.stderr
    )
    assert "WARNING tracking.uri: a sqlite store beside the runs (the default) is on one node's disk" in done.stderr
    # Two nodes: exit 2, one line each with the fix, and nothing written where the run would have gone.
    assert "rc 2" in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: trainer.storage_path: ./runs (the default) is on one node's disk on a Ray cluster of 2 nodes: "
        "checkpoints would be lost with the job's working directory or node and resume= could not find them; "
        "set trainer.storage_path=s3://<bucket>/runs (or PRETRAIN_STORAGE_PATH)",
        "error: tracking.uri: a sqlite store beside the runs (the default) is on one node's disk on a Ray cluster "
        "of 2 nodes; set tracking.uri=http://<mlflow server> (or MLFLOW_TRACKING_URI, or tracking=server)",
    ]
    assert not (tmp_path / "runs").exists()
