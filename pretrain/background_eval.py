"""Evaluation every `eval.every_steps` steps, beside training, as Ray tasks.

At such a step rank 0 sends an fp32 CPU copy of the encoder's weights (gathered under
ZeRO-3) to a `BackgroundEvaluator` actor the driver created, and goes on training.
The actor starts one evaluation task per copy (resources eval.num_cpus/num_gpus); each
task logs `eval/*` metrics at its step into the run. After training the driver waits
for the tasks still running (`drain`), so a finished run holds every result.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pretrain.config import PretrainConfig

log = logging.getLogger("pretrain.background_eval")


def evaluate_weights(
    cfg: PretrainConfig,
    state: dict[str, torch.Tensor],
    *,
    arch_kwargs: dict[str, Any],
    tracking_uri: str,
    run_id: str,
    step: int,
) -> dict[str, Any]:
    """Task body: rebuild the timm encoder from `state` (strict), evaluate, log at `step`."""
    from dataclasses import asdict

    import timm

    from pretrain.evaluate import eval_sources, evaluate_encoder, log_result
    from pretrain.features import Encoder, pick_device
    from pretrain.trainer.worker import configure_logging

    configure_logging()
    vit = timm.create_model(cfg.model.arch, pretrained=False, **arch_kwargs)
    vit.load_state_dict(state, strict=True)
    encoder = Encoder(
        vit=vit.eval(),
        arch=cfg.model.arch,
        arch_kwargs=arch_kwargs,
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
        source=f"step {step}",
        features=getattr(type(cfg.objective), "features", "cls"),
    )
    fit, test = eval_sources(cfg.eval, cfg.data)
    device = pick_device("cuda" if cfg.eval.num_gpus > 0 else "cpu")
    result = evaluate_encoder(encoder, cfg.eval, fit, test, device=device)
    result.step = step
    if run_id:
        log_result(result, tracking_uri=tracking_uri, run_id=run_id, step=step)
    log.info("step %d eval: %s (random init %s)", step, result.encoder, result.baseline)
    return asdict(result)


class BackgroundEvaluator:
    """Ray actor (no CPU of its own): starts and keeps track of the evaluation tasks of one run."""

    def __init__(self, cfg: PretrainConfig, tracking_uri: str, run_id: str, env: dict[str, str]) -> None:
        import ray

        self.cfg, self.tracking_uri, self.run_id = cfg, tracking_uri, run_id
        self.task = ray.remote(evaluate_weights).options(
            num_cpus=cfg.eval.num_cpus,
            num_gpus=cfg.eval.num_gpus,
            runtime_env={"env_vars": env},
            max_retries=1,
        )
        self.pending: dict[int, Any] = {}

    def submit(self, state: dict[str, Any], arch_kwargs: dict[str, Any], step: int) -> None:
        if step in self.pending:  # a retried worker group reaching the same step again
            return
        self.pending[step] = self.task.remote(
            self.cfg, state, arch_kwargs=arch_kwargs, tracking_uri=self.tracking_uri, run_id=self.run_id, step=step
        )

    def drain(self) -> dict[int, dict[str, Any] | str]:
        """Wait for every task: {step: result, or the error's last line}."""
        import ray

        done: dict[int, dict[str, Any] | str] = {}
        for step, ref in sorted(self.pending.items()):
            try:
                done[step] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - one failed evaluation must not hide the others
                lines = [line for line in str(exc).splitlines() if line.strip()]
                done[step] = f"failed: {lines[-1] if lines else type(exc).__name__}"
                log.error("evaluation at step %d %s", step, done[step])
        return done


def start_evaluator(cfg: PretrainConfig, tracking_uri: str, run_id: str, env: dict[str, str]) -> Any:
    """The actor handle the workers get (RunInfo.evaluator), or None when eval.every_steps is 0."""
    if not (cfg.eval.enabled and cfg.eval.every_steps):
        return None
    import ray

    actor = ray.remote(BackgroundEvaluator).options(num_cpus=0, runtime_env={"env_vars": env})
    return actor.remote(cfg, tracking_uri, run_id, env)
