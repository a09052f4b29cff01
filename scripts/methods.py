"""Method benchmark: train objectives for the same steps on the same data, one table of what they learnt.

    python scripts/methods.py [--steps 60] [--model vit_nano] [--objectives all | mae,simclr,...]
    python scripts/methods.py --pairs simclr:resnet18,mocov3:convnext_atto,fcmae:convnextv2_nano_32

Each row is one `python -m pretrain.run objective=<o> model=<m> trainer.max_steps=<steps>` on
this machine (2 workers by default, the objective's CPU preset where it fits the model, the
embedded dataset, its end-of-run evaluation), read back from the run's MLflow record:

loss       mean logged loss of the first and of the last quarter of the run's steps
           ("falls" when the second is lower)
kNN, lin   the exported encoder's kNN and linear-probe top-1 on the held-out images, and the
           same protocols on a randomly initialised encoder of the same architecture
           ("random"); "beats random" is kNN above its random-init figure
img/s      median logged images/s over the workers (after the first window)
peak GiB   the fullest worker's peak memory (resident set on CPU, allocated on GPU)
wall s     launch to exit, evaluation included; for an objective whose inputs come from other
           stages (BEiT v2, MaskDistill, VQ-KD), those stages run first for the same steps and
           their time is inside the figure

Without --pairs every registered objective runs on --model, or, where its backbone family
excludes that model, on the first CPU model of a family it accepts (FCMAE: a ConvNeXt V2).
Figures are printed, never asserted; name the host (printed first) with any figure you quote.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The CPU-sized model of each backbone family (pretrain/conf/model/).
CPU_MODELS = {"vit": "vit_nano", "swin": "swin_nano", "resnet": "resnet18", "convnext": "convnextv2_nano_32"}


@dataclass
class Result:
    objective: str
    model: str
    steps: int
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    knn: float = float("nan")
    knn_random: float = float("nan")
    linear: float = float("nan")
    linear_random: float = float("nan")
    images_per_s: float = float("nan")
    peak_gb: float = float("nan")
    wall_s: float = float("nan")
    error: str = ""

    @property
    def falls(self) -> bool:
        return self.loss_last < self.loss_first


def default_pairs(names: list[str], model: str) -> list[tuple[str, str]]:
    """Each objective on `model`, or on the CPU model of the first family it accepts when `model` is not one."""
    from objectives.registry import get_objective_class
    from pretrain.config import ModelConfig, model_family

    family = model_family(ModelConfig(arch=_arch_of(model)))
    pairs = []
    for name in names:
        accepted = get_objective_class(name).config_class.families
        if "any" in accepted or family in accepted:
            pairs.append((name, model))
        else:
            pairs.append((name, next(CPU_MODELS[f] for f in accepted if f in CPU_MODELS)))
    return pairs


def _arch_of(model: str) -> str:
    from omegaconf import OmegaConf

    path = REPO / "pretrain" / "conf" / "model" / f"{model}.yaml"
    return str(OmegaConf.load(path).arch) if path.is_file() else model


def run_one(objective: str, model: str, steps: int, workers: int, tmp: Path, extra: list[str]) -> Result:
    from mlflow import MlflowClient

    name = f"{objective}-{model}"
    storage = tmp / "runs"
    overrides = [
        f"objective={objective}",
        f"model={model}",
        f"trainer.max_steps={steps}",
        f"trainer.num_workers={workers}",
        f"trainer.checkpoint_every={steps}",
        "trainer.log_every=5",
        f"trainer.storage_path={storage}",
        "tracking.register=false",
        f"name={name}",
        *extra,
    ]
    result = Result(objective, model, steps)
    log_path = tmp / f"{name}.log"
    start = time.monotonic()
    with log_path.open("w") as log:
        rc = subprocess.run(
            [sys.executable, "-m", "pretrain.run", *overrides], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    result.wall_s = time.monotonic() - start
    if rc != 0:
        lines = [line for line in log_path.read_text().splitlines() if line.strip()]
        result.error = f"exit {rc}: {lines[-1] if lines else ''}"[:200]
        return result
    record = json.loads((storage / name / "pretrain_run.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    run_id = record["mlflow_run_id"]

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    losses = [v for s, v in history("loss")]
    quarter = max(1, len(losses) // 4)
    result.loss_first = statistics.fmean(losses[:quarter])
    result.loss_last = statistics.fmean(losses[-quarter:])
    speeds = [v for _, v in history("images_per_sec")][1:] or [v for _, v in history("images_per_sec")]
    result.images_per_s = statistics.median(speeds) * workers if speeds else float("nan")
    result.peak_gb = max((v for _, v in history("sys/peak_memory_gb")), default=float("nan"))
    metrics = client.get_run(run_id).data.metrics
    for attr, key in (
        ("knn", "eval/knn_top1"),
        ("knn_random", "eval/baseline_knn_top1"),
        ("linear", "eval/linear_top1"),
        ("linear_random", "eval/baseline_linear_top1"),
    ):
        setattr(result, attr, metrics.get(key, float("nan")))
    return result


def table(results: list[Result]) -> str:
    lines = [
        "| objective | model | steps | loss first -> last | kNN (random) | linear (random) | beats random | img/s | peak GiB | wall s |",
        "|---|---|---:|---|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.objective} | {r.model} | {r.steps} | failed: {r.error} | | | | | | {r.wall_s:.0f} |")
            continue
        falls = "falls" if r.falls else "does not fall"
        lines.append(
            f"| {r.objective} | {r.model} | {r.steps} | {r.loss_first:.3f} -> {r.loss_last:.3f} ({falls}) "
            f"| {100 * r.knn:.1f}% ({100 * r.knn_random:.1f}%) | {100 * r.linear:.1f}% ({100 * r.linear_random:.1f}%) "
            f"| {'yes' if r.knn > r.knn_random else 'no'} | {r.images_per_s:.0f} | {r.peak_gb:.2f} | {r.wall_s:.0f} |"
        )
    return "\n".join(lines)


def host() -> str:
    """The CPU (model name, family/model numbers, native bf16 or not) and core count."""
    import os

    from pretrain.hardware import cpu_flags, cpu_flags_have_bf16

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in info:
        cpu += f" family {info['cpu family']} model {info.get('model', '?')}"
    flags = cpu_flags()
    bf16 = "" if flags is None else (", native bf16" if cpu_flags_have_bf16(flags) else ", bf16 emulated")
    return f"{cpu}{bf16}, {os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="vit_nano", help="the shared backbone (pretrain/conf/model/ name)")
    parser.add_argument("--objectives", default="all", help="comma-separated objective names, or all")
    parser.add_argument("--pairs", default="", help="objective:model,... instead of --objectives/--model")
    parser.add_argument("override", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()

    from objectives.registry import available

    if args.pairs:
        pairs = [tuple(item.split(":", 1)) for item in args.pairs.split(",") if item]
        if any(len(p) != 2 for p in pairs):
            parser.error("--pairs: objective:model,objective:model,...")
    else:
        names = available() if args.objectives == "all" else [n for n in args.objectives.split(",") if n]
        unknown = sorted(set(names) - set(available()))
        if unknown:
            parser.error(f"unknown objectives {unknown}; registered: {', '.join(available())}")
        pairs = default_pairs(names, args.model)
    print(f"host: {host()}; {args.workers} workers, {args.steps} steps each", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="methods-") as tmp:
        for objective, model in pairs:
            result = run_one(objective, model, args.steps, args.workers, Path(tmp), list(args.override))
            results.append(result)
            print(table([result]).splitlines()[-1], flush=True)
    print()
    print(table(results))
    return 0 if not any(r.error for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
