"""The per-worker trainer: set-up in small steps, then a short step loop that calls its components."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import torch

from pretrain.config import PretrainConfig
from pretrain.engine import (
    build_engine,
    follow_schedule,
    global_batch,
    peak_lr,
    trainer_for_world,
    training_dtype,
)
from pretrain.trainer.checkpoint import Checkpointer
from pretrain.trainer.evaluation import PeriodicEval
from pretrain.trainer.hooks import TrainerHook
from pretrain.trainer.loader import build_loader, train_urls
from pretrain.trainer.metrics import MetricsLogger
from pretrain.trainer.objective import build_objective
from pretrain.trainer.pictures import draw_pictures, remember_first
from pretrain.trainer.step import NonFiniteGuard, to_device, train_step

if TYPE_CHECKING:
    from objectives.base import Objective
    from pretrain.trainer.worker import RunInfo

log = logging.getLogger("pretrain.worker")


class Trainer:
    """One worker's part of a run: builds the engine, loader and components, restores, then trains.

    All ranks construct it and call `train()` in step (its components run collectives).
    """

    def __init__(
        self,
        cfg: PretrainConfig,
        info: RunInfo,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        hooks: Sequence[TrainerHook] = (),
    ) -> None:
        self.configured = cfg  # the recipe as given (logged); self.cfg: as run by these world_size workers
        cfg = self._sized_for(cfg, world_size, rank)
        self.cfg, self.info = cfg, info
        self.rank, self.world_size, self.device = rank, world_size, device
        self.hooks = list(hooks)
        ticks = [time.perf_counter()]  # set-up phases, logged by rank 0 (docs/benchmarks.md: start-up)
        self._configure_torch()
        self.dtype = training_dtype(cfg.deepspeed)
        self.objective = self._build_objective()
        ticks.append(time.perf_counter())
        self.engine = build_engine(self.objective, cfg.optim, cfg.trainer, cfg.deepspeed)
        ticks.append(time.perf_counter())
        self.urls = train_urls(cfg, info.train_url)
        self.loader = build_loader(cfg, self.urls, rank=rank, world_size=world_size, seed=cfg.seed)
        self.checkpointer = Checkpointer(self.engine, rank=rank, world_size=world_size, hooks=self.hooks)
        restored = self.checkpointer.restore(self.loader)
        self.step = restored or 0
        if restored is None:
            self._prepare_objective()
        else:
            follow_schedule(self.engine.lr_scheduler, cfg.optim, cfg.trainer)
        self.metrics = MetricsLogger(
            rank=rank,
            world=world_size,
            device=device,
            max_steps=cfg.trainer.max_steps,
            images_per_step=global_batch(cfg.trainer),
            lr=self.engine.get_lr()[0],
            run_logger=self._open_run_logger(),
            progress_queue=info.progress_queue,
        )
        self.evaluation = PeriodicEval(
            info.evaluator,
            self.engine,
            every_steps=cfg.eval.every_steps,
            max_steps=cfg.trainer.max_steps,
            rank=rank,
            arch_kwargs=self.objective.context.arch_kwargs,
        )
        self.nonfinite = NonFiniteGuard(
            cfg.trainer.max_nonfinite_steps, rank=rank, where=info.run_dir or "the storage path"
        )
        if rank == 0:
            ticks.append(time.perf_counter())
            log.info(
                "set up in %.1f s: objective %.1f s, DeepSpeed engine %.1f s, data and the rest %.1f s",
                ticks[-1] - ticks[0],
                *(b - a for a, b in zip(ticks, ticks[1:], strict=False)),
            )

    @staticmethod
    def _sized_for(cfg: PretrainConfig, world_size: int, rank: int) -> PretrainConfig:
        """cfg with the trainer settings of `world_size` workers (Ray Train may start fewer: trainer.min_workers)."""
        sized = trainer_for_world(cfg.trainer, world_size)
        if sized is cfg.trainer:
            return cfg
        if rank == 0:
            t = cfg.trainer
            log.warning(
                "%d of trainer.num_workers=%d workers (elastic, trainer.min_workers=%d): each accumulates %d "
                "micro-batches of %d, global batch %d (configured %d), peak lr %.3g (configured %.3g)",
                world_size,
                t.num_workers,
                t.min_workers,
                sized.grad_accum,
                t.batch_size,
                global_batch(sized),
                global_batch(t),
                peak_lr(cfg.optim, sized),
                peak_lr(cfg.optim, t),
            )
        return replace(cfg, trainer=sized)

    def _configure_torch(self) -> None:
        """Threads per worker on CPU; deterministic kernels when trainer.deterministic."""
        t = self.cfg.trainer
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(t.cpus_per_worker)))
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    def _build_objective(self) -> Objective:
        """The objective on the CPU with the same initial weights on every rank; frozen parts on the device."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # DeepSpeed also broadcasts rank 0's weights
        objective = build_objective(
            cfg, self.device, self.dtype, tracking_uri=self.info.tracking_uri, total_steps=cfg.trainer.max_steps
        )
        for frozen in objective.frozen_modules().values():
            frozen.to(self.device).eval().requires_grad_(False)
        if cfg.trainer.compile:
            objective.compile()  # in place: parameter names (checkpoints, exports) stay as they are
        return objective

    def _prepare_objective(self) -> None:
        """A fresh run: the objective's `prepare` (e.g. k-means centroids), if it has one, on its own stream."""
        from objectives.base import Objective

        if type(self.objective).prepare is Objective.prepare:
            return
        # Another seed, so preparing does not advance the training data.
        loader = build_loader(self.cfg, self.urls, rank=self.rank, world_size=self.world_size, seed=self.cfg.seed + 1)
        tic = time.perf_counter()
        self.objective.prepare(to_device(b, self.device, self.dtype) for b in loader)
        loader.close()
        if self.rank == 0:
            log.info("objective prepared in %.1f s", time.perf_counter() - tic)

    def _open_run_logger(self) -> Any:
        """Rank 0 with tracking: the MLflow logger, after logging the config (or tagging the resume)."""
        if self.rank != 0 or not self.info.tracking_uri:
            return None
        from pretrain.tracking import RunLogger

        logger = RunLogger(self.info.tracking_uri, self.info.mlflow_run_id)
        if self.step == 0:
            logger.log_config(asdict(self.configured))
        else:
            logger.set_tags({"pretrain.resumed_at_step": str(self.step)})
        logger.set_tags({"pretrain.workers": str(self.world_size)})  # this attempt's (elastic: trainer.min_workers)
        return logger

    def train(self) -> None:
        """Steps until trainer.max_steps: log every log_every, checkpoint every checkpoint_every; then export."""
        t = self.cfg.trainer
        kept: list[dict[str, Any]] = []  # the pictures' batch: the first this attempt trains on
        batches = remember_first(iter(self.loader), kept)
        start_step = self.step
        for hook in self.hooks:
            hook.on_start(start_step)
        while self.step < t.max_steps:
            tic = time.perf_counter()
            step_metrics = train_step(
                self.engine,
                batches,
                step=self.step,
                seed=self.cfg.seed,
                rank=self.rank,
                device=self.device,
                dtype=self.dtype,
                inject_nan=any(hook.inject_nan(self.step + 1) for hook in self.hooks),
            )
            self.step += 1
            step = self.step
            for hook in self.hooks:
                hook.after_step(step)
            self.nonfinite.update(step, skipped=step_metrics is None)
            if step_metrics is not None:
                self.metrics.add_step(step, step_metrics, time.perf_counter() - tic)

            if t.pictures_every and step % t.pictures_every == 0 and step < t.max_steps and kept:
                self._pictures(kept[0], step)
            save_now = step % t.checkpoint_every == 0 or step == t.max_steps
            if not (save_now or step % t.log_every == 0):
                continue
            window = self.metrics.close_window(step, self.loader, self.nonfinite.total)
            if save_now:
                self.checkpointer.save(step, self.metrics.report(step, window), self.loader.state_dict())
            self.evaluation.maybe_submit(step)
            for hook in self.hooks:
                hook.after_report(step)
        self._finish(batches, start_step, kept)

    def _pictures(self, batch: dict[str, Any], step: int, final: bool = False) -> None:
        """All ranks: the objective's pictures of the kept batch at this step (rank 0 logs them)."""
        draw_pictures(
            self.engine,
            batch,
            rank=self.rank,
            device=self.device,
            dtype=self.dtype,
            logger=self.metrics.run_logger,
            step=step,
            final=final,
        )

    def _finish(self, batches: Iterator[dict[str, Any]], start_step: int, kept: list[dict[str, Any]]) -> None:
        """All ranks: the objective's pictures of the kept batch (or one more), then the exports (pretrain.export)."""
        self._pictures(kept[0] if kept else next(batches), self.step, final=True)
        self.loader.close()
        if self.rank == 0:
            log.info("rank 0 finished %d steps (%d this attempt)", self.step, self.step - start_step)
        if not self.info.run_dir:
            return
        from pretrain.export import export_models

        tags: dict[str, str] = {}
        if self.rank == 0 and self.info.tracking_uri and self.info.mlflow_run_id:
            from pretrain.publish import lineage

            # Registered tokenizers and centroids carry the lineage the encoder gets in pretrain.publish.
            name = self.info.run_dir.rstrip("/").rsplit("/", 1)[-1]
            tags = lineage(
                self.cfg,
                run_id=self.info.mlflow_run_id,
                run_name=name,
                steps=self.step,
                tracking_uri=self.info.tracking_uri,
            )
        export_models(
            self.engine,
            rank=self.rank,
            run_dir=self.info.run_dir,
            storage_options=self.cfg.data.storage_options,
            tracking_uri=self.info.tracking_uri,
            run_id=self.info.mlflow_run_id,
            tags=tags,
        )
