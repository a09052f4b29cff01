"""Losing a node mid-run: a Ray cluster of two nodes on this machine (the stack's head and a second
`ray start --address` node, one CPU each, so one training worker per node), data and checkpoints on
the stack's S3 endpoint, tracking on its MLflow server. The second node is killed (its whole process
group: `ray start`, raylet, workers) once the step-4 checkpoint is registered; Ray Train's elastic
worker range (trainer.min_workers=1) restarts the group on the one node left, from that S3
checkpoint (ZeRO-3: the optimizer state of 2 workers re-partitioned for 1), in the same MLflow run,
and the epoch goes on with every sample once. The run is SimMIM on a small Swin (the Swin family's
ZeRO-3 run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pretrain.trainer.faults import FAULT_ENV

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "scripts" / "stack.sh"
BUCKET = "pretrain"
STEPS = 8
# GCS declares a node dead after this many missed health checks of this period (Ray's defaults:
# 3 s x 5); a shorter wait keeps the test short, the path is the same.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
# Ray Train's elastic policy sizes the restarted group from a resource view refreshed every 20 s:
# right after the loss it may still ask for 2 workers and wait for them until this timeout (Ray's
# default 60 s; the failed start counts against trainer.max_failures), then starts 1.
START_TIMEOUT = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
RUN = [
    # SimMIM on a small Swin: the Swin family's ZeRO-3 run (docs/objectives.md), re-partitioned here.
    "objective=simmim",
    "model=swin_nano",
    "trainer.batch_size=8",
    "trainer.num_workers=2",
    "trainer.min_workers=1",
    "trainer.max_failures=2",
    "trainer.log_every=1",
    f"trainer.max_steps={STEPS}",
    "trainer.checkpoint_every=2",
    "deepspeed.zero_stage=3",
    "data.num_workers=1",
    f"data.urls=s3://{BUCKET}/demo/train.manifest.json",
    "eval.enabled=false",
    "tracking.register=false",
    "name=nodeloss",
]


def run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_second_node_killed_run_goes_on_elastically_from_the_s3_checkpoint(tmp_path: Path) -> None:
    stack_dir = tmp_path / "stack"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    base_env.pop("PRETRAIN_STORAGE_PATH", None)
    base_env.update(FAST_NODE_DEATH)
    up = run(["bash", str(STACK), "up", "--dir", str(stack_dir), "--free-ports", "--num-cpus", "1"], base_env, 240)
    assert up.returncode == 0, up.stderr
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines() if line.startswith("export ")
    )
    env = {**base_env, **exports}
    node = None
    try:
        # The second node, as a user adds one: `ray start --address=<head>` (token auth from the stack's env).
        ray_cli = str(Path(sys.executable).parent / "ray")
        node = subprocess.Popen(
            [ray_cli, "start", "--address", env["RAY_ADDRESS"], "--num-cpus", "1", "--block", "--disable-usage-stats"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        written = run(
            [sys.executable, "-m", "data.write", "synthetic:256", f"s3://{BUCKET}/demo", "--shard-size", "32"], env, 180
        )
        assert written.returncode == 0, written.stderr
        wait_for_nodes(env, 2)

        # Rank 0 holds after step 4 (its checkpoint registered); the other rank waits in step 5's collectives.
        driver = subprocess.Popen(
            [sys.executable, "-m", "pretrain.run", *RUN],
            cwd=REPO, env={**env, **START_TIMEOUT, FAULT_ENV: "4:hold:0"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        lines: list[str] = []
        held = threading.Event()

        def read() -> None:
            assert driver.stdout is not None
            for line in driver.stdout:
                lines.append(line)
                if "holding after step 4" in line:
                    held.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert held.wait(300), "".join(lines[-60:])
        os.killpg(node.pid, signal.SIGKILL)  # the node dies: no shutdown, no goodbye to the GCS
        node.wait(30)
        assert driver.wait(420) == 0, "".join(lines[-80:])
        reader.join(10)
        log = "".join(lines)

        from mlflow import MlflowClient

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        (found,) = client.search_runs(
            [client.get_experiment_by_name("pretrain").experiment_id], "attributes.run_name = 'nodeloss'"
        )
        run_id = found.info.run_id
        mlflow_run = client.get_run(run_id)
        assert mlflow_run.info.status == "FINISHED"
        tags = mlflow_run.data.tags
        # One MLflow run across both attempts: restored at step 4 from S3, on the one node left.
        assert tags["pretrain.resumed_at_step"] == "4" and tags["pretrain.workers"] == "1", tags
        assert mlflow_run.data.params["trainer.num_workers"] == "2"  # the recipe as given
        assert "1 of trainer.num_workers=2 workers (elastic" in log, log[-3000:]
        assert "ZeRO-3 state of 2 workers re-partitioned for 1" in log, log[-3000:]
        losses = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))
        # Every sample once: 16 per step before (2 workers x 8) and after (1 worker x 8 x 2 micro-batches).
        samples = {m.step: m.value for m in client.get_metric_history(run_id, "data/samples")}
        assert samples[4] == 64 and samples[STEPS] == 16 * STEPS, samples
        # The checkpoints are in S3, the last one written by the single worker.
        import fsspec

        fs = fsspec.filesystem("s3", **storage_options(env))
        names = [p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/runs/nodeloss")]
        kept = sorted(name for name in names if name.startswith("checkpoint_0"))
        assert kept[-1] == f"checkpoint_{STEPS:08d}", kept
        assert fs.exists(f"{BUCKET}/runs/nodeloss/{kept[-1]}/rank_0.pt")
        assert not fs.exists(f"{BUCKET}/runs/nodeloss/{kept[-1]}/rank_1.pt")
    finally:
        if node is not None and node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        down = run(["bash", str(STACK), "down", "--dir", str(stack_dir), "--stop-timeout", "10"], base_env, 180)
        assert down.returncode == 0, down.stderr


def storage_options(env: dict[str, str]) -> dict:
    return {
        "key": env["AWS_ACCESS_KEY_ID"],
        "secret": env["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"]},
    }


def wait_for_nodes(env: dict[str, str], count: int, timeout: float = 60.0) -> None:
    """Until the cluster has `count` live nodes, asked from one subprocess that polls (this process
    keeps no Ray connection; an interpreter per poll cost about 2.5 cpu-s each)."""
    probe = (
        "import sys, time, ray; ray.init(); deadline = time.monotonic() + float(sys.argv[2])\n"
        "while (alive := sum(n['Alive'] for n in ray.nodes())) != int(sys.argv[1]) and time.monotonic() < deadline:\n"
        "    time.sleep(0.5)\n"
        "print(alive)"
    )
    done = run([sys.executable, "-c", probe, str(count), str(timeout)], env, timeout + 60)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)], done.stdout + done.stderr
