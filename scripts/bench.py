"""Training throughput: a plain PyTorch loop vs the full stack, and model FLOP utilisation.

    python scripts/bench.py [--model vit_small] [--objective mae] [--batch 16] [--steps 8]
                            [--warmup 3] [--precisions fp32,bf16] [--threads N]

Measured in one run, on this machine, for the same model, objective and batch:

    peak    matmul FLOP/s of this CPU/GPU (square torch.mm, fp32 and bf16), measured first
    (a)     plain loop: one process, the objective module built as the workers build it,
            AdamW, `--steps` steps over batches already in memory (made by the real loader
            beforehand), after `--warmup` untimed steps
    (b)     full stack: `python -m pretrain.run` (Ray Train, 1 worker, DeepSpeed ZeRO-0,
            streaming the embedded dataset through the loader, MLflow logging every
            `--steps` steps, 2 x `--steps` steps); throughput from the wall-clock time
            between its two MLflow loss records, so reporting and logging are inside the
            window and start-up and warm-up are not
    ratio   (b) / (a): the cost of the orchestration. Goal >= 0.97
    MFU     model FLOP/s (torch.utils.flop_counter over one forward + backward of (a)) / peak.
            Goals for MAE ViT-S/16 on this CPU: >= 70% fp32, >= 55% bf16

bf16 in (a) means bf16 parameters and inputs (what DeepSpeed's bf16 mode computes in);
(b) uses deepspeed.precision=bf16. Both use `--threads` intra-op threads (default: all
cores), the full stack through trainer.cpus_per_worker. Prints a markdown table; timings
are never asserted. Everything runs on CPU unless a GPU is present (then on it, NCCL).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def peak_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 3.0) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def compose(args: argparse.Namespace, precision: str, extra: list[str] | None = None) -> list[str]:
    return [
        f"objective={args.objective}",
        f"model={args.model}",
        "preset=none",
        f"trainer.batch_size={args.batch}",
        "trainer.num_workers=1",
        f"trainer.cpus_per_worker={args.threads}",
        f"trainer.use_gpu={str(torch.cuda.is_available()).lower()}",
        "trainer.grad_accum=1",
        f"deepspeed.precision={precision}",
        "deepspeed.zero_stage=0",
        "data.num_workers=1",
        *(extra or []),
    ]


def plain_loop(args: argparse.Namespace, precision: str, device: torch.device) -> tuple[float, float]:
    """(images/s, FLOP per step) of the bare loop with data in memory."""
    from torch.utils.flop_counter import FlopCounterMode

    from data.default import ensure_default_dataset
    from data.stream import build_train_loader, resolve_urls
    from objectives.base import RunContext
    from objectives.registry import get_objective_class
    from pretrain.backbone import arch_kwargs, build_backbone
    from pretrain.compose import load_config
    from pretrain.engine import param_groups, peak_lr
    from pretrain.loop import _to_device

    cfg = load_config(compose(args, precision))
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(cfg)
    torch.manual_seed(0)
    cls = get_objective_class(cfg.objective.name)
    context = RunContext(
        tracking_uri="",
        input_mean=tuple(cfg.data.mean),
        input_std=tuple(cfg.data.std),
        arch=cfg.model.arch,
        arch_kwargs=arch_kwargs(cfg.model),
        total_steps=args.warmup + args.steps,
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = cls(cfg.objective, build_backbone(cfg.model), context).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=peak_lr(cfg.optim, cfg.trainer))
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
    batches = [_to_device(next(stream), device, dtype) for _ in range(min(args.warmup + args.steps, 8))]
    loader.close()

    def step(i: int) -> None:
        out = model(batches[i % len(batches)])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        out = model(batches[0])
        out.loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = float(counter.get_total_flops())
    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch / (time.perf_counter() - start), flops


def full_stack(args: argparse.Namespace, precision: str, storage: Path) -> float:
    """images/s of `pretrain.run` between two MLflow loss records (steady state)."""
    from mlflow import MlflowClient

    from pretrain.launch import RUN_RECORD
    from pretrain.run import main

    every = args.steps  # window 1: start-up and warm-up; window 2: timed
    total = 2 * every
    name = f"bench-{precision}"
    overrides = compose(
        args,
        precision,
        [
            f"trainer.max_steps={total}",
            f"trainer.log_every={every}",
            f"trainer.checkpoint_every={total}",
            "eval.enabled=false",
            "tracking.register=false",
            f"trainer.storage_path={storage}",
            f"name={name}",
        ],
    )
    if main(overrides) != 0:
        raise RuntimeError(f"pretrain.run {' '.join(overrides)} failed")
    import json

    record = json.loads((storage / name / RUN_RECORD).read_text())
    history = MlflowClient(record["tracking_uri"]).get_metric_history(record["mlflow_run_id"], "loss")
    stamps = {m.step: m.timestamp / 1000.0 for m in history}
    return (total - every) * args.batch / (stamps[total] - stamps[every])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="vit_small")
    parser.add_argument("--objective", default="mae")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = [p for p in args.precisions.split(",") if p]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as tmp:
        os.environ.setdefault("PRETRAIN_CACHE", str(Path(tmp) / "cache"))
        for precision in precisions:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            peak = peak_flops(dtype, device)
            plain, flops = plain_loop(args, precision, device)
            stack = full_stack(args, precision, Path(tmp) / "runs")
            rows.append((precision, peak, plain, flops, stack))
    print(
        f"\n{args.objective} {args.model}, batch {args.batch}, {args.steps} timed steps, {args.threads} threads, {device}\n"
    )
    print(
        "| precision | peak matmul GFLOP/s | (a) plain img/s | (b) full stack img/s | b/a | GFLOP/step | MFU (a) | MFU (b) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for precision, peak, plain, flops, stack in rows:
        mfu_a = flops * plain / args.batch / peak
        mfu_b = flops * stack / args.batch / peak
        print(
            f"| {precision} | {peak / 1e9:.0f} | {plain:.2f} | {stack:.2f} | {stack / plain:.3f} | "
            f"{flops / 1e9:.1f} | {100 * mfu_a:.0f}% | {100 * mfu_b:.0f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
