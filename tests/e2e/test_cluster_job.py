"""The cluster path end to end: `scripts/stack.sh up` (S3 endpoint, MLflow server, Ray head with
token auth) -> a bad-config job fails -> demo shards to s3:// -> one `ray job submit ... objective=beitv2`
runs the chain MAE -> VQ-KD -> BEiT v2 through the MLflow registry -> the same command's plan reuses
the first two stages -> the driver stopped mid-run and a resume job -> `stack.sh down`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pretrain.trainer.faults import FAULT_ENV

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "scripts" / "stack.sh"
BUCKET = "pretrain"
# The tiny run of tests/e2e/conftest.py, less what each objective sets itself.
TINY = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "trainer.batch_size=8",
    "trainer.num_workers=2",
    "trainer.log_every=1",
    "trainer.max_steps=3",
    "trainer.checkpoint_every=3",
    "data.num_workers=1",
    "eval.probe_weight_decays=[1e-4]",
    f"data.urls=s3://{BUCKET}/demo/train.manifest.json",
    # Evaluate on the same S3 shards: 20% of them (by sample key) held out.
    f"eval.test_urls=s3://{BUCKET}/demo/train.manifest.json",
]


def session_alive(sid: int) -> list[int]:
    """Live processes of session `sid` (each stack component runs in a session of its own)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            alive.append(int(entry.name))
    return alive


def run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def submit(
    env: dict[str, str], name: str, args: list[str], *submit_opts: str
) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit` (waits for the end, streaming the logs); returns the submission id and the result."""
    job_id = f"e2e-{name}-{uuid.uuid4().hex[:8]}"
    ray = str(Path(sys.executable).parent / "ray")
    done = run([ray, "job", "submit", "--submission-id", job_id, *submit_opts, "--", *args], env, timeout=600)
    return job_id, done


def jobs(env: dict[str, str]) -> Any:
    """Ray's job SDK client, authenticated with the cluster's token (in this process: polling with
    `ray job logs` cost a fresh interpreter, about 2 cpu-s, per poll)."""
    from ray.job_submission import JobSubmissionClient

    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    return JobSubmissionClient(env["RAY_API_SERVER_ADDRESS"], headers={"Authorization": f"Bearer {token}"})


def job_status(env: dict[str, str], job_id: str) -> str:
    return str(jobs(env).get_job_status(job_id).value)


def client_runs(mlflow_url: str) -> list:
    """Every run of the `pretrain` experiment on the MLflow server."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_url, mlflow_url)
    return client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])


def test_stack_up_jobs_registry_checkpoints_and_down(tmp_path: Path) -> None:
    stack_dir = tmp_path / "stack"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    up = run(["bash", str(STACK), "up", "--dir", str(stack_dir), "--free-ports", "--num-cpus", "2"], base_env, 240)
    assert up.returncode == 0, up.stderr
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines() if line.startswith("export ")
    )
    assert exports["RAY_AUTH_MODE"] == "token" and exports["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
    components = json.loads((stack_dir / "stack.json").read_text())["components"]
    assert [c["name"] for c in components] == ["s3", "mlflow", "ray"]
    env = {**base_env, **exports}
    try:
        status = run(["bash", str(STACK), "status", "--dir", str(stack_dir)], base_env, 60)
        assert status.returncode == 0 and status.stdout.count("running") == 3, status.stdout

        # Token auth is on: a client without RAY_AUTH_MODE=token is turned away.
        ray_cli = str(Path(sys.executable).parent / "ray")
        no_token = run([ray_cli, "job", "list"], {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}, 60)
        assert no_token.returncode != 0 and "token" in (no_token.stdout + no_token.stderr).lower()

        # A bad config: the job fails in seconds, its one-line error at the end of the logs.
        bad_id, bad = submit(env, "bad", ["python", "-m", "pretrain.run", "objective=nope"], "--working-dir", ".")
        assert bad.returncode != 0
        assert job_status(env, bad_id) == "FAILED"
        logs = run([ray_cli, "job", "logs", bad_id], env, 60).stdout.strip().splitlines()
        assert logs[-1].startswith("error: objective: unknown objective 'nope'; valid choices: beitv2"), logs[-3:]
        assert not any("Traceback" in line for line in logs)

        # Demo shards to the S3 endpoint, as a user would with the exported variables.
        written = run(
            [sys.executable, "-m", "data.write", "synthetic:256", f"s3://{BUCKET}/demo", "--shard-size", "32"], env, 180
        )
        assert written.returncode == 0, written.stderr

        from mlflow import MlflowClient

        mlflow_url = exports["MLFLOW_TRACKING_URI"]
        client = MlflowClient(mlflow_url, mlflow_url)

        # The whole BEiT v2 chain in one job: MAE teacher -> VQ-KD tokenizer -> BEiT v2 (ZeRO-3), each
        # stage sized on the command line. Storage (PRETRAIN_STORAGE_PATH) and tracking
        # (MLFLOW_TRACKING_URI) come from the environment the stack gave the Ray head; the last stage
        # keeps its checkpoints elsewhere; the runtime env (working dir, variables) from cluster/.
        chain = [
            *TINY,
            "objective=beitv2",
            "stages.mae.objective.decoder_embed_dim=16",
            "stages.mae.objective.decoder_depth=1",
            "stages.mae.objective.decoder_num_heads=2",
            "stages.vqkd.objective.num_codes=32",
            "stages.vqkd.objective.decoder_embed_dim=16",
            "stages.vqkd.objective.decoder_num_heads=2",
            # The teacher and the tokenizer are what the next stages need; their evaluations are not
            # (the last stage's evaluation and its `best` rule are checked below). The MAE stage has
            # the user's data and no evaluation URLs: it skips its evaluation on its own.
            "stages.mae.eval.test_urls=",
            "stages.vqkd.eval.enabled=false",
            "stages.beitv2.deepspeed.zero_stage=3",
            f"stages.beitv2.trainer.storage_path=s3://{BUCKET}/ckpt",
            "name=mim",
        ]
        mim_id, mim = submit(
            env, "beitv2", ["python", "-m", "pretrain.run", *chain], "--runtime-env", "cluster/runtime_env.yaml"
        )
        assert mim.returncode == 0, mim.stdout[-3000:] + mim.stderr[-2000:]
        assert job_status(env, mim_id) == "SUCCEEDED"
        # The plan, each stage's summary and the chain's in the job log (worker logs streamed to the client).
        assert "== pretrain plan: beitv2, 3 stage(s) ==" in mim.stdout
        # Each stage's first lines name its recipe (32 px on CPUs: the CPU presets).
        for name in ("mae", "vqkd", "beitv2"):
            assert f"recipe: {name} on vit_nano with the CPU preset {name}_cpu (" in mim.stdout, name
        assert mim.stdout.count("== pretrain summary ==") == 3 and mim.stdout.count("step 3/3") >= 3
        chain_summary = mim.stdout.split("== pipeline summary: beitv2 ==")[1].splitlines()
        assert chain_summary[1].startswith("1. mae          trained  encoder models:/mae-vit_nano/1")
        assert "tokenizer models:/vqkd-mae-vit_nano/1" in chain_summary[2]
        assert chain_summary[3].startswith("3. beitv2       trained  encoder models:/beitv2-vit_nano/1")

        # The same command again would train only BEiT v2: its plan (no Ray, no training) says so.
        again = run([sys.executable, "-m", "pretrain.run", *chain, "pipeline.dry_run=true"], env, 120)
        assert again.returncode == 0, again.stderr
        plan = again.stdout.splitlines()
        assert plan[1].startswith("1. mae          reuse  models:/mae-vit_nano/1 (built by this stage with the same")
        assert plan[2].startswith("2. vqkd         reuse  models:/vqkd-mae-vit_nano/1 (built by this stage")
        assert [line.split()[:3] for line in plan if line.startswith("3.")] == [["3.", "beitv2", "train"]]

        # The MLflow server holds the three stage runs, finished, nested under the pipeline's run...
        by_name = {r.info.run_name: r for r in client_runs(mlflow_url)}
        (parent,) = [r for n, r in by_name.items() if n.startswith("pipeline-beitv2-")]
        names = {n.split("-")[0] if n != "mim" else "mim": n for n in by_name if not n.startswith("pipeline-")}
        assert set(names) == {"mae", "vqkd", "mim"}
        runs = {key: by_name[name] for key, name in names.items()}
        runs["tok"] = runs.pop("vqkd")
        for name, keys in {"tok": ["loss", "vqkd/codebook_usage"], "mim": ["loss", "beitv2/mim_loss"]}.items():
            assert runs[name].info.status == "FINISHED"
            assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
            for key in keys:
                history = [m.value for m in client.get_metric_history(runs[name].info.run_id, key)]
                assert len(history) == 3 and all(math.isfinite(v) for v in history), (name, key, history)
        tok_run, mim_run = runs["tok"].info.run_id, runs["mim"].info.run_id
        usage = [m.value for m in client.get_metric_history(tok_run, "vqkd/codebook_usage")]
        assert all(0 < v <= 1 for v in usage), usage
        # 2 workers x batch 8 per step, all read from the S3 shards, none skipped.
        samples = sorted((m.step, m.value) for m in client.get_metric_history(tok_run, "data/samples"))
        assert samples == [(1, 16.0), (2, 32.0), (3, 48.0)]
        assert {m.value for m in client.get_metric_history(tok_run, "data/skipped")} == {0.0}
        assert runs["tok"].data.params["data.urls"] == f"s3://{BUCKET}/demo/train.manifest.json"
        assert runs["tok"].data.tags["pretrain.export.tokenizer"] == "models:/vqkd-mae-vit_nano/1"
        assert runs["mim"].data.tags["pretrain.export.encoder"] == "models:/beitv2-vit_nano/1"
        # Block masks of the paper's fraction: round(64 * 0.3827) = 24 of the 8 x 8 patches.
        assert client.get_metric_history(mim_run, "beitv2/mask_ratio")[-1].value == pytest.approx(24 / 64)
        pictures = {
            run_id: {a.path for a in client.list_artifacts(run_id, "pictures")} for run_id in (tok_run, mim_run)
        }
        assert pictures[tok_run] == {"pictures/code_ids.png", "pictures/codebook_usage.png"}
        assert pictures[mim_run] == {"pictures/token_ids.png"}
        # ... and the registered models with their lineage: teacher -> tokenizer -> encoder, each pinned.
        (teacher,) = client.search_model_versions("name='mae-vit_nano'")
        assert teacher.run_id == runs["mae"].info.run_id
        # User data without evaluation data: said once, not evaluated on the demo shapes, `best` untouched.
        assert mim.stdout.count("evaluation skipped: data.urls is your data and no labelled evaluation data") == 1
        assert not any(key.startswith("eval.") for key in teacher.tags)
        assert client.get_registered_model("mae-vit_nano").aliases == {}
        (tokenizer,) = client.search_model_versions("name='vqkd-mae-vit_nano'")
        assert tokenizer.run_id == tok_run and tokenizer.tags["pretrain.teacher"] == "models:/mae-vit_nano/1"
        (encoder,) = client.search_model_versions("name='beitv2-vit_nano'")
        assert encoder.run_id == mim_run
        assert encoder.tags["pretrain.tokenizer"] == "models:/vqkd-mae-vit_nano/1"
        score, baseline = float(encoder.tags["eval.knn_top1"]), float(encoder.tags["eval.baseline_knn_top1"])
        assert 0.0 <= score <= 1.0
        # `best` only for a version that beats its own random init (3 steps may not).
        aliases = client.get_registered_model("beitv2-vit_nano").aliases
        assert aliases == ({"best": encoder.version} if score > baseline else {}), (aliases, score, baseline)
        card = client.get_model_version("beitv2-vit_nano", encoder.version).description
        lineage = card.split("## Lineage")[1]
        assert lineage.index("models:/mae-vit_nano/1") < lineage.index("models:/vqkd-mae-vit_nano/1")

        # Checkpoints (and the MLflow artifacts) live in the S3 bucket.
        import s3fs

        fs = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": exports["AWS_ENDPOINT_URL"]},
            key=exports["AWS_ACCESS_KEY_ID"],
            secret=exports["AWS_SECRET_ACCESS_KEY"],
        )
        tok_dir = f"{BUCKET}/runs/{runs['tok'].info.run_name}"
        for run_dir in (tok_dir, f"{BUCKET}/ckpt/mim"):
            files = {p.rsplit("/", 1)[1] for p in fs.ls(f"{run_dir}/checkpoint_00000003")}
            assert {"rank_0.pt", "rank_1.pt", "latest"} <= files, (run_dir, files)
        assert fs.isfile(f"{tok_dir}/export/tokenizer/model.safetensors")
        assert json.loads(fs.cat(f"{tok_dir}/export/tokenizer/pretrain.json"))["kind"] == "tokenizer"
        # MLflow's artifact store in S3 holds the artifacts' files: the tokenizer's and the encoders' (teachers).
        artifacts = fs.find(f"{BUCKET}/mlflow")
        kinds = {json.loads(fs.cat(p))["kind"] for p in artifacts if p.endswith("/pretrain.json")}
        assert {"tokenizer", "encoder"} <= kinds
        assert any(p.endswith("/model.safetensors") for p in artifacts)

        # The encoder gathered whole under ZeRO-3 loads as a teacher of a next stage, by its runs:/ URI.
        from objectives.components.teacher import load_teacher
        from objectives.configs import TeacherConfig

        encoder = load_teacher(TeacherConfig(source=f"runs:/{mim_run}/encoder"), tracking_uri=mlflow_url)
        assert sum(p.numel() for p in encoder.parameters()) > 10_000

        # The driver dies: `ray job stop` while rank 0 holds after step 4 (its checkpoint in S3);
        # a new job with resume= continues from there, in the same MLflow run, each sample once.
        drill = [o for o in TINY if not o.startswith(("trainer.max_steps=", "trainer.checkpoint_every="))]
        drill += ["trainer.max_steps=8", "trainer.checkpoint_every=4", "eval.enabled=false", "name=dk"]
        holding = json.dumps({"working_dir": ".", "env_vars": {FAULT_ENV: "4:hold:0", "RAY_AUTH_MODE": "token"}})
        held_id, held = submit(
            env, "held", ["python", "-m", "pretrain.run", *drill], "--no-wait", "--runtime-env-json", holding
        )
        assert held.returncode == 0, held.stderr
        deadline = time.monotonic() + 240
        while "holding after step 4" not in jobs(env).get_job_logs(held_id):
            status = job_status(env, held_id)  # PENDING until its driver starts
            assert time.monotonic() < deadline and status in ("PENDING", "RUNNING"), status
            time.sleep(2)
        stopped = run([ray_cli, "job", "stop", held_id], env, 120)
        assert stopped.returncode == 0 and job_status(env, held_id) == "STOPPED", stopped.stderr
        resumed_id, resumed = submit(
            env, "resumed", ["python", "-m", "pretrain.run", "resume=dk"], "--runtime-env", "cluster/runtime_env.yaml"
        )
        assert resumed.returncode == 0 and job_status(env, resumed_id) == "SUCCEEDED", resumed.stdout[-3000:]
        assert "restored step 4 from" in resumed.stdout and "finished 8 steps (4 this attempt)" in resumed.stdout
        (dk,) = [r for r in client_runs(mlflow_url) if r.info.run_name == "dk"]
        assert dk.info.status == "FINISHED"
        samples = sorted((m.step, m.value) for m in client.get_metric_history(dk.info.run_id, "data/samples"))
        assert samples == [(step, 16.0 * step) for step in range(1, 9)]

        # The stack's S3 credentials (fresh per stack) are nowhere in what the runs left behind:
        # MLflow params, tags and artifacts, the run records, the job logs, the services' logs.
        import mlflow.artifacts

        needles = [exports["AWS_SECRET_ACCESS_KEY"].encode(), exports["AWS_ACCESS_KEY_ID"].encode()]
        for run_id in (runs["mae"].info.run_id, tok_run, mim_run, parent.info.run_id):
            data = client.get_run(run_id).data
            texts = [*data.params.values(), *data.tags.values()]
            assert not any(n.decode() in t for n in needles for t in texts), run_id
            local = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, dst_path=str(tmp_path / run_id), tracking_uri=mlflow_url
                )
            )
            for f in (p for p in local.rglob("*") if p.is_file()):
                assert not any(n in f.read_bytes() for n in needles), f
        blobs = {
            path: fs.cat(path) for path in (f"{tok_dir}/pretrain_run.json", f"{BUCKET}/ckpt/mim/pretrain_run.json")
        }
        blobs["job logs"] = (mim.stdout + mim.stderr + again.stdout + again.stderr).encode()
        state = json.loads((stack_dir / "stack.json").read_text())
        logs = [
            p
            for root in (stack_dir, Path(state["ray_temp"]))
            for p in root.rglob("*")
            if p.is_file() and p.suffix in (".log", ".out", ".err")
        ]
        assert len(logs) > 10
        blobs.update({str(p): p.read_bytes() for p in logs})
        secret, key_id = needles
        leaked = sorted(name for name, blob in blobs.items() if secret in blob)
        assert not leaked, f"the S3 secret key found in {leaked}"
        # The key id (not a secret) may appear only in the object store's own request log: MLflow
        # hands out presigned download URLs, and SigV4 puts the signer's key id in them.
        named = sorted(name for name, blob in blobs.items() if key_id in blob and not name.endswith("/s3.log"))
        assert not named, f"the S3 access key id found in {named}"
    finally:
        # After jobs Ray's GCS and raylet take ~25 s on SIGTERM: SIGKILL after 10 s (docs/cluster.md).
        down = run(["bash", str(STACK), "down", "--dir", str(stack_dir), "--stop-timeout", "10"], base_env, 180)
    assert down.returncode == 0, down.stderr
    for c in components:
        assert not session_alive(c["pid"]), f"{c['name']} left processes behind: {session_alive(c['pid'])}"
