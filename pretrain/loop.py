"""The per-worker training loop that Ray Train runs on every rank."""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pretrain.config import PretrainConfig

if TYPE_CHECKING:
    from objectives.base import Objective

log = logging.getLogger("pretrain.worker")

# Fault injection for tests and drills (docs/reliability.md), read by every worker:
#   "<step>"             every worker raises right after the report of that step, once per
#                        run (not again after resuming past it);
#   "<step>:kill:<rank>" that rank SIGKILLs itself right after computing that step, before
#                        reporting it, on the first attempt only (kill -9 of a worker mid-step);
#   "<step>:kill-in-checkpoint:<rank>"  that rank SIGKILLs itself while the checkpoint of
#                        that step is being written (the other ranks upload their parts).
FAULT_ENV = "PRETRAIN_INJECT_FAULT_AT_STEP"
# Steps whose loss is replaced by NaN on every rank: "4" or "4,5" or "4-" (from 4 on).
NAN_ENV = "PRETRAIN_INJECT_NAN_AT_STEPS"


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for trainer.max_nonfinite_steps optimizer steps in a row."""


def parse_fault(spec: str) -> tuple[int, str, int]:
    """FAULT_ENV -> (step, "raise" | "kill", rank); (0, "", 0) when unset."""
    if not spec:
        return 0, "", 0
    step, _, rest = spec.partition(":")
    mode, _, rank = rest.partition(":")
    return int(step), mode or "raise", int(rank or 0)


def nan_steps(spec: str) -> tuple[set[int], int]:
    """NAN_ENV -> (the listed steps, first step of an open range or 0)."""
    listed, open_from = set(), 0
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part.endswith("-"):
            open_from = int(part[:-1])
        else:
            listed.add(int(part))
    return listed, open_from


@dataclass
class RunInfo:
    """What the driver hands every worker besides the config."""

    train_url: str  # "" = the embedded default dataset
    tracking_uri: str  # "" = no MLflow logging
    mlflow_run_id: str
    run_dir: str = ""  # <storage_path>/<name>: exports go to <run_dir>/export/
    progress_queue: Any = None  # a ray.util.queue.Queue when the driver shows a progress bar
    evaluator: Any = None  # a BackgroundEvaluator actor when eval.every_steps > 0


def configure_logging() -> None:
    """INFO lines from this project's loggers (pretrain.*, data.*, objectives.*) only."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("pretrain", "data", "objectives"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
    # botocore says at INFO where it found credentials and the endpoint, per client.
    for name in ("botocore", "aiobotocore", "s3fs"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO (on a logger named after its file path)."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # other Ray versions: only noise is at stake
        pass


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of the objective's randomness (masks) for one micro-step on one rank.

    Seeding per step makes a resumed run draw the same masks as an uninterrupted one.
    """
    return (seed * 1_000_003 + step * 7919 + micro * 104_729 + rank * 15_485_863) % (2**63 - 1)


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors (and lists of tensors, e.g. views) to the device; floating ones to the training dtype."""

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, non_blocking=True)
        return t.to(dtype) if t.is_floating_point() else t

    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = move(value)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            moved[key] = [move(v) for v in value]
        else:
            moved[key] = value
    return moved


def _grad_norm(engine: Any) -> float | None:
    """Global gradient norm; DeepSpeed only computes it under ZeRO/mixed precision."""
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    local = torch.stack([g.detach().float().norm() for g in grads]).norm()
    return float(local)  # ZeRO-0 gradients are already all-reduced: same norm on every rank


class _Meter:
    """Averages of step metrics between two log points."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.images = 0
        self.seconds = 0.0

    def add(self, metrics: dict[str, float], images: int, seconds: float) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.images += images
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}


def _all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce)."""
    import torch.distributed as dist

    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def _all_max(value: float, device: torch.device) -> float:
    """The largest `value` over ranks."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory so far: allocated on the GPU, or resident on the CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    unit = 1 if sys.platform == "darwin" else 2**10  # ru_maxrss is in bytes on macOS, KiB on Linux
    return peak * unit / 2**30


def _all_finite(loss: torch.Tensor, device: torch.device) -> bool:
    """Whether the loss is finite on every rank (one decision, so all ranks skip together)."""
    import torch.distributed as dist

    ok = torch.isfinite(loss.detach()).all().to(device=device, dtype=torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def train_step(
    engine: Any,
    batches: Any,
    *,
    step: int,
    seed: int,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    inject_nan: bool = False,
) -> dict[str, float] | None:
    """One optimizer step (all micro-steps of gradient accumulation); returns its metrics.

    None when the loss of the step's first micro-batch was NaN/inf on some rank: then no
    rank runs backward or the optimizer for that step (weights, optimizer state and
    DeepSpeed's counters stay as they were) and the step's batches are consumed.
    """
    accum = engine.gradient_accumulation_steps()
    losses: list[float] = []
    extra: dict[str, float] = {}
    grad_norm = None
    for micro in range(accum):
        batch = to_device(next(batches), device, dtype)
        torch.manual_seed(step_seed(seed, step, micro, rank))
        out = engine(batch)
        loss = out.loss * float("nan") if inject_nan else out.loss
        if not _all_finite(loss, device):
            if micro > 0:
                # Earlier micro-batches already added their gradients (and DeepSpeed counted
                # them): there is no clean way to take part of a step back.
                raise NonFiniteLossError(
                    f"loss is NaN/inf in micro-batch {micro + 1}/{accum} of step {step + 1}, after the "
                    "step's earlier micro-batches were accumulated; steps are skipped only when the "
                    "first micro-batch is non-finite"
                )
            for _ in range(1, accum):  # the rest of this step's data goes too
                next(batches)
            return None
        engine.backward(loss)
        losses.append(float(loss.detach()))
        for key, value in out.metrics.items():
            extra[key] = extra.get(key, 0.0) + float(value) / accum
        if micro == accum - 1:  # gradients are complete (and reduced) before the update
            grad_norm = _grad_norm(engine)
        engine.step()
    engine.module.after_step(step)
    metrics = {"loss": sum(losses) / accum, "lr": engine.get_lr()[0], **extra}
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    return metrics


def draw_pictures(
    engine: Any, batch: dict[str, Any], *, rank: int, device: torch.device, dtype: torch.dtype, logger: Any
) -> None:
    """The objective's pictures of one batch (every rank: ZeRO-3 gathers collectively), logged by rank 0."""
    objective = engine.module
    objective.eval()
    try:
        with torch.no_grad():
            pictures = objective.pictures(to_device(batch, device, dtype))
    except Exception as exc:  # noqa: BLE001 - a picture must not fail a finished run; say why there is none
        log.warning("rank %d: no pictures (%s: %s)", rank, type(exc).__name__, exc)
        pictures = {}
    finally:
        objective.train()
    if logger is not None:
        for name, image in pictures.items():
            logger.client.log_image(logger.run_id, image, f"pictures/{name}.png")
        if pictures:
            log.info("logged pictures: %s", ", ".join(sorted(pictures)))


def build_objective(
    cfg: PretrainConfig, device: torch.device, dtype: torch.dtype, *, tracking_uri: str, total_steps: int
) -> Objective:
    """`cfg.objective` on a fresh `cfg.model` backbone, on the CPU, with attention set for `device`/`dtype`."""
    from objectives.base import RunContext
    from objectives.registry import get_objective_class
    from pretrain.backbone import arch_kwargs, build_backbone, fused_attn_enabled, set_fused_attn

    context = RunContext(
        tracking_uri=tracking_uri,
        input_mean=tuple(cfg.data.mean),
        input_std=tuple(cfg.data.std),
        arch=cfg.model.arch,
        arch_kwargs=arch_kwargs(cfg.model),
        total_steps=total_steps,
    )
    objective = get_objective_class(cfg.objective.name)(cfg.objective, build_backbone(cfg.model), context)
    # The objective's own blocks too (MAE's decoder, teachers), not only the backbone's.
    set_fused_attn(objective, fused_attn_enabled(cfg.model.fused_attn, device, dtype))
    return objective


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point on each worker."""
    import ray.train
    import ray.train.torch

    from data.default import ensure_default_dataset
    from data.stream import build_train_loader, resolve_urls
    from objectives.base import Objective
    from objectives.registry import get_objective_class
    from pretrain import checkpoint
    from pretrain.engine import build_engine, global_batch, training_dtype
    from pretrain.progress import push
    from pretrain.tracking import RunLogger

    configure_logging()
    _quiet_ray_train_reports()
    cfg: PretrainConfig = loop_config["cfg"]
    info: RunInfo = loop_config["info"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    t = cfg.trainer
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    # Same initial weights on every rank (DeepSpeed also broadcasts rank 0's).
    torch.manual_seed(cfg.seed)
    objective_cls = get_objective_class(cfg.objective.name)
    dtype = training_dtype(cfg.deepspeed)
    objective = build_objective(cfg, device, dtype, tracking_uri=info.tracking_uri, total_steps=t.max_steps)
    for frozen in objective.frozen_modules().values():
        frozen.to(device).eval().requires_grad_(False)
    if t.compile:
        objective.compile()  # in place: parameter names (checkpoints, exports) stay as they are
    engine = build_engine(objective, cfg.optim, t, cfg.deepspeed)

    train_url = info.train_url or ensure_default_dataset(cfg.data).train_url
    loader = build_train_loader(
        cfg.data,
        objective_cls.data_needs(cfg.objective),
        urls=resolve_urls(
            train_url, cfg.data.storage_options, retries=cfg.data.io_retries, retry_wait_s=cfg.data.io_retry_wait_s
        ),
        img_size=cfg.model.img_size,
        batch_size=t.batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        patch_size=cfg.model.patch_size,
    )

    step = 0
    # Ray Train hands back the latest reported checkpoint after a failure or when a
    # run with the same name and storage path starts again (resume=).
    latest = ray.train.get_checkpoint()
    if latest is not None:
        with latest.as_directory() as path:
            step, data_states = checkpoint.restore(engine, Path(path), rank=rank, world_size=world)
        loader.load_state_dict(data_states)
        log.info("rank %d: resumed at step %d", rank, step)

    if latest is None and type(objective).prepare is not Objective.prepare:
        # Its own stream (another seed), so preparing does not advance the training data.
        prep_loader = build_train_loader(
            cfg.data,
            objective_cls.data_needs(cfg.objective),
            urls=loader.urls,
            img_size=cfg.model.img_size,
            batch_size=t.batch_size,
            rank=rank,
            world_size=world,
            seed=cfg.seed + 1,
            patch_size=cfg.model.patch_size,
        )
        tic = time.perf_counter()
        batches = (to_device(b, device, dtype) for b in prep_loader)
        objective.prepare(batches)
        prep_loader.close()
        if rank == 0:
            log.info("objective prepared in %.1f s", time.perf_counter() - tic)

    logger = None
    if rank == 0 and info.tracking_uri:
        logger = RunLogger(info.tracking_uri, info.mlflow_run_id)
        if step == 0:
            from dataclasses import asdict

            logger.log_config(asdict(cfg))
        else:
            logger.set_tags({"pretrain.resumed_at_step": str(step)})

    fault_step, fault_mode, fault_rank = parse_fault(os.environ.get(FAULT_ENV, ""))
    nan_listed, nan_from = nan_steps(os.environ.get(NAN_ENV, ""))
    first_loss: float | None = None
    images_per_step = global_batch(t)
    meter = _Meter()
    batches = iter(loader)
    start_step = step
    lr = engine.get_lr()[0]
    nonfinite_total, nonfinite_run = 0, 0
    while step < t.max_steps:
        tic = time.perf_counter()
        inject_nan = step + 1 in nan_listed or 0 < nan_from <= step + 1
        step_metrics = train_step(
            engine, batches, step=step, seed=cfg.seed, rank=rank, device=device, dtype=dtype, inject_nan=inject_nan
        )
        step += 1
        if fault_mode == "kill" and step == fault_step and rank == fault_rank and start_step == 0:
            log.warning("rank %d: injected kill -9 at step %d (%s)", rank, step, FAULT_ENV)
            os.kill(os.getpid(), signal.SIGKILL)
        if step_metrics is None:
            # Skipped on every rank (the decision is collective); the weights did not move.
            nonfinite_total += 1
            nonfinite_run += 1
            if rank == 0:
                log.warning(
                    "step %d: loss NaN/inf, step skipped (%d in a row, %d in this attempt)",
                    step,
                    nonfinite_run,
                    nonfinite_total,
                )
            if nonfinite_run >= t.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"loss NaN/inf for {nonfinite_run} steps in a row (steps {step - nonfinite_run + 1}-{step}, "
                    f"trainer.max_nonfinite_steps={t.max_nonfinite_steps}); stopped, the last checkpoint in "
                    f"{info.run_dir or 'the storage path'} holds the weights before them"
                )
        else:
            nonfinite_run = 0
            lr = step_metrics["lr"]
            meter.add(step_metrics, images_per_step, time.perf_counter() - tic)
            if rank == 0:
                push(
                    info.progress_queue,
                    step,
                    step_metrics["loss"],
                    images_per_step / max(meter.seconds / meter.count, 1e-9),
                )

        log_now = step % t.log_every == 0 or step == t.max_steps
        save_now = step % t.checkpoint_every == 0 or step == t.max_steps
        if not (log_now or save_now):
            continue
        counts = {
            "data/skipped": float(loader.skipped),
            "data/samples": float(loader.samples_seen),
            "data/io_retries": float(loader.io_retries),
        }
        metrics = _all_mean({**meter.means(), **counts}, device)
        for key in counts:  # totals over ranks
            metrics[key] = float(round(metrics[key] * world))
        metrics["lr"] = lr  # same on every rank; not an average over the window
        metrics["images_per_sec"] = meter.images / max(meter.seconds, 1e-9)
        metrics["data/epoch"] = float(loader.epoch)
        metrics["train/nonfinite_skipped"] = float(nonfinite_total)
        metrics["sys/peak_memory_gb"] = _all_max(peak_memory_gb(device), device)  # the fullest worker
        metrics.setdefault("loss", float("nan"))  # every step of the window was skipped
        meter = _Meter()
        first_loss = metrics["loss"] if first_loss is None else first_loss
        if logger is not None:
            logger.log_metrics(metrics, step)
            logger.flush()
        if rank == 0 and info.progress_queue is None:
            log.info(
                "step %d/%d loss %.4f lr %.3g %.1f img/s",
                step,
                t.max_steps,
                metrics["loss"],
                lr,
                metrics["images_per_sec"],
            )
        # Only checkpoints go through ray.train.report: Ray Train v2 holds one report per worker
        # until its controller polls (every 2 s), so a report per log step capped training at one
        # log window per 2 s. Metrics reach MLflow above; the run summary reads the last report.
        report = {"step": step, "loss_first": first_loss, **metrics}
        if save_now:
            with tempfile.TemporaryDirectory(prefix=f"ckpt-rank{rank}-") as tmp:
                checkpoint.save(engine, Path(tmp), rank=rank, step=step, data_state=loader.state_dict())
                if fault_mode == "kill-in-checkpoint" and step == fault_step and rank == fault_rank and start_step == 0:
                    # The other ranks upload their part of this checkpoint; it is never complete.
                    log.warning("rank %d: injected kill -9 while writing checkpoint %d (%s)", rank, step, FAULT_ENV)
                    os.kill(os.getpid(), signal.SIGKILL)
                ray.train.report(
                    report,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint_{step:08d}",
                )
            # Waits (up to one poll, 2 s) until the controller has collected the checkpoint's
            # report from this worker's one-report slot. The next step's collectives need every
            # worker past here, so once any worker gets further the checkpoint is registered,
            # and a worker that dies later restarts from it (without this, a death within ~2 s
            # of a checkpoint lost its registration and the restart began one checkpoint earlier).
            ray.train.report(report)
        if info.evaluator is not None and step % cfg.eval.every_steps == 0 and step < t.max_steps:
            from pretrain.export import encoder_state

            state = encoder_state(engine, rank=rank, zero_stage=cfg.deepspeed.zero_stage)
            if state is not None:  # fire and forget: the actor starts a task, training goes on
                info.evaluator.submit.remote(state, objective.context.arch_kwargs, step)
        if fault_mode == "raise" and step == fault_step and start_step < fault_step:
            raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")
    draw_pictures(engine, next(batches), rank=rank, device=device, dtype=dtype, logger=logger)
    loader.close()
    if rank == 0:
        log.info("rank 0 finished %d steps (%d this attempt)", step, step - start_step)
    if info.run_dir:
        from pretrain.export import export_models

        export_models(
            engine,
            rank=rank,
            zero_stage=cfg.deepspeed.zero_stage,
            run_dir=info.run_dir,
            storage_options=cfg.data.storage_options,
            tracking_uri=info.tracking_uri,
            run_id=info.mlflow_run_id,
        )
