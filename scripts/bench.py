"""Training throughput of the full stack against a plain PyTorch loop, model FLOP utilisation,
scaling over workers, ZeRO stages, start-up time, and what each optimisation changes.

    python scripts/bench.py [--model vit_small] [--objective mae] [--batch 16] [--steps 10]
                            [--warmup 2] [--threads N] [--sections plain,stack,scaling,startup]

Everything is measured in this one run, on this machine, for the same model, objective and
per-worker batch, and printed as markdown tables (docs/benchmarks.md holds a copy):

peak      matmul FLOP/s of this CPU/GPU (square torch.mm, fp32 and bf16), measured first and
          again last; the higher of the two is the MFU's denominator.
plain     (a) one process, the objective module built as the workers build it, the workers'
          AdamW (fused kernel), `--steps` timed steps over batches already in memory (made by
          the real loader beforehand), after `--warmup` untimed ones. Rows: fp32; timm's
          explicit attention instead of the fused kernel; torch's default (unfused) AdamW, in
          fp32 and bf16; bf16 autocast over fp32 weights; bf16 weights (what
          DeepSpeed's bf16 mode computes in; explicit attention, as model.fused_attn=auto picks
          in bf16 on a CPU) and, on a CPU, the same with the fused kernel; `torch.compile`.
          The stack section also runs the plain loop inside one Ray Train worker (Ray's
          processes around it, none of the stack's code).
stack     (b) `python -m pretrain.run` as a subprocess: Ray Train, DeepSpeed, the embedded
          dataset streamed through the loader, MLflow logging every step. Throughput comes
          from the wall-clock times of MLflow's loss records of steps 1 + warmup and
          1 + warmup + steps, so logging and reporting are inside the window and start-up
          is not. Rows: 1 worker with `--threads` threads, fp32 and bf16 (b/a against the
          matching plain row, measured again right after them and averaged, as the VM's
          speed drifts; goal >= 0.97), loader workers 0 and 2 (default 1),
          trainer.compile=true.
scaling   the plain loop on one thread vs 1 worker x 1 thread (b/a with cores left for
          Ray's processes); 1 worker x 1 thread vs 2 workers x 1 thread (ZeRO 0): scaling efficiency
          = throughput(2) / (2 x throughput(1)); ZeRO stages 1, 2, 3 on 2 workers x 1 thread.
          Per-worker memory is the fullest worker's peak (sys/peak_memory_gb: resident set
          on CPU, allocated memory on GPU).
startup   the default `python -m pretrain.run` (2 workers, the demo model), one step, from
          launching the command to the end of step 1: once "fresh" (as `make install` leaves
          a machine: DeepSpeed's op prebuilt into an empty extension cache, no demo data yet),
          then `--warm-runs` times "warm"; with the milestones in between (Ray up, the
          workers' set-up logged). `--sections startup` runs only this (about 3 minutes).

MFU = model FLOP/s / peak matmul FLOP/s of the precision, where model FLOPs per sample are
counted by torch.utils.flop_counter over one forward + backward of the plain fp32 loop (the
optimizer step is not counted, as usual). Goals for MAE ViT-S/16 on this CPU: >= 70% fp32,
>= 55% bf16. "start" is the time from launching the command to the end of its first step.
Timings are printed, never asserted. Everything runs on CPU unless a GPU is present (then
on it, the stack over NCCL).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pretrain.hardware import device_precision_problem  # noqa: E402

SECTIONS = ("plain", "stack", "scaling", "startup")


def peak_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 3.0) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


@dataclass
class Row:
    section: str
    label: str
    precision: str  # fp32 | bf16: which peak the MFU divides by
    images_per_s: float | None = None
    note: str = ""
    baseline: str = ""  # label of the row this one is compared with
    extras: dict[str, float] = field(default_factory=dict)  # start_s, memory_gb, compile_s


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"objective={args.objective}",
        f"model={args.model}",
        "preset=none",
        f"trainer.batch_size={args.batch}",
        "trainer.grad_accum=1",
        f"trainer.use_gpu={str(torch.cuda.is_available()).lower()}",
        "deepspeed.zero_stage=0",
        "deepspeed.precision=fp32",
        "data.num_workers=1",
        *args.override,
    ]


# ---------------------------------------------------------------- (a) the plain loop


def plain_loop(
    args: argparse.Namespace,
    device: torch.device,
    *,
    weights: torch.dtype = torch.float32,
    autocast: bool = False,
    fused_attn: bool | str = "auto",  # model.fused_attn
    compile_model: bool = False,
    count_flops: bool = False,
    fused_adamw: bool = True,
) -> tuple[float, float, float]:
    """(images/s, model FLOP per sample or 0, seconds of the first step) of the bare loop."""
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from data.default import ensure_default_dataset
    from data.stream import build_train_loader, resolve_urls
    from objectives.registry import get_objective_class
    from pretrain.compose import load_config
    from pretrain.engine import build_optimizer
    from pretrain.trainer.objective import build_objective
    from pretrain.trainer.step import to_device

    cfg = OmegaConf.to_object(load_config([*base_overrides(args), f"model.fused_attn={str(fused_attn).lower()}"]))
    torch.manual_seed(0)
    cls = get_objective_class(cfg.objective.name)
    model = build_objective(cfg, device, weights, tracking_uri="", total_steps=1 + args.warmup + args.steps)
    model = model.to(device=device, dtype=weights).train()
    # The workers' optimizer (fused where the device has the kernel), or torch's default for the
    # device (a per-tensor loop on CPU).
    optimizer = build_optimizer(model, cfg.optim, cfg.trainer, allow_fused=fused_adamw)
    loader = build_train_loader(
        cfg.data,
        cls.data_needs(cfg.objective),
        urls=resolve_urls(ensure_default_dataset(cfg.data).train_url, {}),
        img_size=cfg.model.img_size,
        batch_size=args.batch,
        rank=0,
        world_size=1,
        seed=0,
        patch_size=cfg.model.patch_size,
    )
    stream = iter(loader)
    batches = [to_device(next(stream), device, weights) for _ in range(min(1 + args.warmup + args.steps, 8))]
    loader.close()

    flops = 0.0
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            model(batches[0]).loss.backward()
        optimizer.zero_grad(set_to_none=True)
        flops = float(counter.get_total_flops()) / args.batch
    if compile_model:
        model.compile()

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step(0)  # the first step: compiles, if compiling
    sync()
    first_s = time.perf_counter() - start
    for i in range(args.warmup):
        step(1 + i)
    sync()
    start = time.perf_counter()
    for i in range(args.steps):
        step(1 + args.warmup + i)
    sync()
    return args.steps * args.batch / (time.perf_counter() - start), flops, first_s


def plain_in_ray_train(args: argparse.Namespace, tmp: Path, threads: int) -> float:
    """images/s of the plain loop run inside one Ray Train worker (a local Ray, as pretrain.run starts).

    Our code is the same as in (a); what changes is the process around it: a Ray worker
    beside Ray's and Ray Train's own processes. This separates their cost from the stack's.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig

    from pretrain.launch import start_local_ray, torch_trainer_class

    use_gpu = torch.cuda.is_available()

    out = tmp / "plain-in-ray-train.json"  # Ray Train v2 keeps metrics only with checkpoints

    def loop(config: dict) -> None:
        torch.set_num_threads(threads)
        device = torch.device("cuda" if use_gpu else "cpu")
        out.write_text(json.dumps({"images_per_s": plain_loop(args, device)[0]}))

    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(paths), "PRETRAIN_CACHE": os.environ["PRETRAIN_CACHE"]}
    start_local_ray(runtime_env={"env_vars": env})
    try:
        torch_trainer_class()(
            loop,
            scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(storage_path=str(tmp / "ray"), name="plain-in-ray-train"),
        ).fit()
    finally:
        ray.shutdown()
    return float(json.loads(out.read_text())["images_per_s"])


# ---------------------------------------------------------------- (b) the full stack


def full_stack(
    args: argparse.Namespace, tmp: Path, name: str, workers: int, threads: int, extra: list[str]
) -> dict[str, float]:
    """Launch `python -m pretrain.run`; images/s between two MLflow loss records, start-up, memory."""
    from mlflow import MlflowClient

    total = 1 + args.warmup + args.steps
    storage = tmp / "runs"
    overrides = [
        *base_overrides(args),
        f"trainer.num_workers={workers}",
        f"trainer.cpus_per_worker={threads}",
        f"trainer.max_steps={total}",
        "trainer.log_every=1",
        f"trainer.checkpoint_every={total}",
        "eval.enabled=false",
        "tracking.register=false",
        f"trainer.storage_path={storage}",
        f"name={name}",
        *extra,
    ]
    log_path = tmp / f"{name}.log"
    launched = time.time()
    with log_path.open("w") as log:
        rc = subprocess.run(
            [sys.executable, "-m", "pretrain.run", *overrides], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    if rc != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise RuntimeError(f"pretrain.run {' '.join(overrides)} exited {rc}:\n" + "\n".join(tail))
    record = json.loads((storage / name / "pretrain_run.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    stamps = {m.step: m.timestamp / 1000.0 for m in client.get_metric_history(record["mlflow_run_id"], "loss")}
    memory = client.get_metric_history(record["mlflow_run_id"], "sys/peak_memory_gb")
    first, last = 1 + args.warmup, total
    return {
        "images_per_s": (last - first) * args.batch * workers / (stamps[last] - stamps[first]),
        "start_s": stamps[1] - launched,
        "memory_gb": max(m.value for m in memory),
    }


# ---------------------------------------------------------------- start-up


LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO (\S+): (.*)")


def log_times(text: str) -> dict[str, float]:
    """Epoch times of the start-up milestones in a `pretrain.run` log (driver and workers log local time)."""
    marks = {"ray up": "a local Ray instance", "set up": "set up in ", "step 1": "step 1/"}
    found: dict[str, float] = {}
    for stamp, _, message in LOG_LINE.findall(text):
        for mark, needle in marks.items():
            if mark not in found and needle in message:
                found[mark] = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:]) / 1000
    return found


def start_up(tmp: Path, warm_runs: int) -> list[dict[str, Any]]:
    """`python -m pretrain.run` (the default run, one step) from launch to the end of step 1.

    "fresh": a just-installed machine, as `make install` leaves it: `pretrain.prebuild` builds
    DeepSpeed's op into an empty extension cache and generates the demo dataset into an empty
    dataset cache. "warm": the same command again.
    """
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions"),
        "PRETRAIN_CACHE": str(tmp / "startup-cache"),
    }
    tic = time.perf_counter()
    built = subprocess.run([sys.executable, "-m", "pretrain.prebuild"], env=env, capture_output=True, text=True)
    prebuild_s = time.perf_counter() - tic
    print(f"install step: {'; '.join(built.stdout.strip().splitlines())} ({prebuild_s:.0f} s)", file=sys.stderr)
    rows = []
    for i in range(1 + warm_runs):
        name = "fresh" if i == 0 else f"warm {i}"
        storage = tmp / "startup-runs"
        overrides = [
            "trainer.max_steps=1",
            "eval.enabled=false",
            "tracking.register=false",
            f"trainer.storage_path={storage}",
            f"name=start-{i}",
        ]
        launched = time.time()
        out = subprocess.run(
            [sys.executable, "-m", "pretrain.run", *overrides], cwd=REPO, env=env, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"pretrain.run {' '.join(overrides)} exited {out.returncode}: {out.stdout[-2000:]}")
        marks = log_times(out.stdout + out.stderr)
        rows.append({"run": name, "launched": launched, **marks})
        print(f"start-up {name}: {marks.get('step 1', float('nan')) - launched:.1f} s", file=sys.stderr)
    return rows


def print_start_up(rows: list[dict[str, Any]]) -> None:
    print("\n| run | command -> step 1 s | Ray up s | Ray up -> worker set up s | set up -> step 1 s |")
    print("|---|---|---|---|---|")
    for row in rows:
        t0 = row["launched"]
        ray, setup, step = (row.get(k, float("nan")) for k in ("ray up", "set up", "step 1"))
        print(f"| {row['run']} | {step - t0:.1f} | {ray - t0:.1f} | {setup - ray:.1f} | {step - setup:.1f} |")


# ---------------------------------------------------------------- the tables


class Rows(list[Row]):
    """The table so far; each row is announced on stderr as it is measured (a full run takes minutes)."""

    def append(self, row: Row) -> None:
        super().append(row)
        speed = "failed" if row.images_per_s is None else f"{row.images_per_s:.2f} img/s"
        print(f"bench: {row.section} / {row.label}: {speed}", file=sys.stderr, flush=True)


def by_label(rows: list[Row]) -> dict[str, Row]:
    return {row.label: row for row in rows}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(rows: Rows, peaks: dict[str, float], flops_per_sample: float, header: str) -> None:
    labelled = by_label(rows)
    print(f"\n{header}\n")
    print(
        "| peak matmul (higher of start and end) | "
        + " | ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items())
        + " |"
    )
    print("|---|" + "---|" * len(peaks))
    print(f"\nmodel FLOPs per sample (forward + backward): {flops_per_sample / 1e9:.2f} GFLOP\n")
    print("| section | run | img/s | vs | ratio | MFU | start s | memory GiB | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = labelled.get(row.baseline)
        ratio = None
        if base is not None and base.images_per_s and row.images_per_s:
            ratio = row.images_per_s / base.images_per_s
        mfu = None
        if row.images_per_s and flops_per_sample:
            mfu = 100 * row.images_per_s * flops_per_sample / peaks[row.precision]
        print(
            f"| {row.section} | {row.label} | {fmt(row.images_per_s, '.2f')} | {row.baseline or '-'} | "
            f"{fmt(ratio, '.3f')} | {fmt(mfu, '.0f')}{'%' if mfu is not None else ''} | "
            f"{fmt(row.extras.get('start_s'), '.1f')} | {fmt(row.extras.get('memory_gb'), '.2f')} | {row.note} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="vit_small")
    parser.add_argument("--objective", default="mae")
    parser.add_argument("--batch", type=int, default=16, help="per worker")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (~1 min each)")
    parser.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    parser.add_argument("--warm-runs", type=int, default=3, help="start-up: runs after the fresh one")
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    if "startup" in sections:
        with tempfile.TemporaryDirectory(prefix="pretrain-startup-") as tmp_name:
            print_start_up(start_up(Path(tmp_name), args.warm_runs))
        sections.remove("startup")
        if not sections:
            return 0

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 rows only where the device computes bf16 natively (an AVX2-only CPU emulates it ~300x
    # slower than fp32: the rows would take hours and say nothing about the stack).
    no_bf16 = device_precision_problem("bf16", device)
    if no_bf16:
        print(f"bf16 rows skipped: {no_bf16}", file=sys.stderr)
    peaks = {"fp32": peak_flops(torch.float32, device)}
    if not no_bf16:
        peaks["bf16"] = peak_flops(torch.bfloat16, device)
    rows = Rows()
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ.setdefault("PRETRAIN_CACHE", str(tmp / "cache"))
        for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PRETRAIN_STORAGE_PATH"):
            os.environ.pop(name, None)  # a local run, whatever the shell exported

        ips, flops, _ = plain_loop(args, device, count_flops=True)
        rows.append(Row("plain", "a fp32", "fp32", ips, "fused attention (model.fused_attn=auto)"))
        if "plain" in sections:
            ips, _, _ = plain_loop(args, device, fused_attn=False)
            rows.append(Row("plain", "a fp32 explicit attention", "fp32", ips, "model.fused_attn=false", "a fp32"))
            ips, _, _ = plain_loop(args, device, fused_adamw=False)
            rows.append(Row("plain", "a fp32 unfused AdamW", "fp32", ips, "torch's default AdamW", "a fp32"))
        if "plain" in sections and not no_bf16:
            ips, _, _ = plain_loop(args, device, autocast=True)
            rows.append(Row("plain", "a bf16 autocast", "bf16", ips, "fp32 weights, bf16 matmuls", "a fp32"))
        if ("plain" in sections or "stack" in sections) and not no_bf16:
            ips, _, _ = plain_loop(args, device, weights=torch.bfloat16)
            rows.append(
                Row("plain", "a bf16", "bf16", ips, "bf16 weights and optimizer; explicit attention (auto)", "a fp32")
            )
            if device.type == "cpu":  # what auto avoids there
                ips, _, _ = plain_loop(args, device, weights=torch.bfloat16, fused_attn=True)
                rows.append(Row("plain", "a bf16 fused attention", "bf16", ips, "model.fused_attn=true", "a bf16"))
        if "plain" in sections and not no_bf16:
            ips, _, _ = plain_loop(args, device, weights=torch.bfloat16, fused_adamw=False)
            rows.append(Row("plain", "a bf16 unfused AdamW", "bf16", ips, "torch's default AdamW", "a bf16"))
        if "plain" in sections and not args.no_compile:
            ips, _, first_s = plain_loop(args, device, compile_model=True)
            rows.append(Row("plain", "a fp32 compiled", "fp32", ips, f"first step {first_s:.0f} s", "a fp32"))

        def stack(section: str, label: str, precision: str, baseline: str, workers: int, threads: int, *extra: str):
            name = label.replace(" ", "-").replace("=", "")
            try:
                got = full_stack(args, tmp, name, workers, threads, list(extra))
            except RuntimeError as e:
                print(f"warning: {label}: {e}", file=sys.stderr)
                rows.append(Row(section, label, precision, None, "failed (see stderr)", baseline))
                return
            ips = got.pop("images_per_s")
            rows.append(Row(section, label, precision, ips, " ".join(extra), baseline, got))

        if "stack" in sections:
            t = args.threads
            ips = plain_in_ray_train(args, tmp, t)
            rows.append(
                Row("stack", "a fp32 in a Ray Train worker", "fp32", ips, "the plain loop, hosted by Ray", "a fp32")
            )
            stack("stack", "b fp32", "fp32", "a fp32 mean", 1, t)
            if not no_bf16:
                stack("stack", "b bf16", "bf16", "a bf16 mean", 1, t, "deepspeed.precision=bf16")
            # The VM's speed drifts by several % within minutes: b/a is taken against the mean of
            # the plain loop measured before and right after the two stack rows.
            for label, weights in (("a fp32", torch.float32), ("a bf16", torch.bfloat16))[: 1 if no_bf16 else 2]:
                before = by_label(rows)[label].images_per_s
                again, _, _ = plain_loop(args, device, weights=weights)
                rows.append(Row("plain", f"{label} again", label.split()[1], again, "after the stack rows", label))
                rows.append(
                    Row("plain", f"{label} mean", label.split()[1], (before + again) / 2, "baseline of b/a", label)
                )
            stack("stack", "b fp32 loader 0", "fp32", "b fp32", 1, t, "data.num_workers=0")
            stack("stack", "b fp32 loader 2", "fp32", "b fp32", 1, t, "data.num_workers=2")
            if not args.no_compile:
                stack("stack", "b fp32 compiled", "fp32", "b fp32", 1, t, "trainer.compile=true")
        if "scaling" in sections:
            # One thread leaves the other cores to Ray's own processes: b/a with room for them.
            torch.set_num_threads(1)
            ips, _, _ = plain_loop(args, device)
            torch.set_num_threads(args.threads)
            rows.append(Row("scaling", "a fp32 x 1 thread", "fp32", ips, "plain loop, one thread"))
            stack("scaling", "1 worker x 1 thread", "fp32", "a fp32 x 1 thread", 1, 1)
            stack("scaling", "2 workers x 1 thread ZeRO-0", "fp32", "1 worker x 1 thread", 2, 1)
            for stage in (1, 2, 3):
                label = f"2 workers x 1 thread ZeRO-{stage}"
                stack("scaling", label, "fp32", "2 workers x 1 thread ZeRO-0", 2, 1, f"deepspeed.zero_stage={stage}")

    # The host's speed drifts: the peak is measured again at the end and the higher of the two
    # is the denominator (a conservative MFU; a single early sample once gave fp32 "MFU" > 90%).
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if precision in peaks:
            peaks[precision] = max(peaks[precision], peak_flops(dtype, device))
    header = (
        f"{args.objective} {args.model}, batch {args.batch} per worker, {args.steps} timed steps after "
        f"{1 + args.warmup}, {args.threads} threads, {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print_tables(rows, peaks, flops, header)
    labelled = by_label(rows)
    one, pair = labelled.get("1 worker x 1 thread"), labelled.get("2 workers x 1 thread ZeRO-0")
    if one and pair and one.images_per_s and pair.images_per_s:
        print(f"\nscaling efficiency 1 -> 2 workers: {pair.images_per_s / (2 * one.images_per_s):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
