"""DeepSpeed engine set-up: config dict, AdamW (parameter groups, fused kernel), LARS or SGD, warmup + cosine schedule."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pretrain.config import DeepSpeedConfig, OptimConfig, TrainerConfig

# Parameters named like these get no weight decay (timm/MAE/BEiT convention), besides
# every 1-d parameter (biases, norm scales).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "reg_token", "dist_token", "relative_position_bias_table")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights, and (norms, biases, position/special tokens) without decay."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or leaf in NO_DECAY_NAMES or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def global_batch(trainer: TrainerConfig) -> int:
    """Images per optimizer step over all workers."""
    return trainer.batch_size * trainer.grad_accum * trainer.num_workers


def trainer_for_world(trainer: TrainerConfig, world_size: int) -> TrainerConfig:
    """The trainer settings of a run that got `world_size` workers (elastic: fewer than num_workers).

    The per-worker micro-batch stays; each worker accumulates num_workers x grad_accum /
    world_size micro-batches, so the global batch, the learning rate and the samples per
    step stay the recipe's. When world_size does not divide that product, the accumulation
    is rounded up: the global batch grows a little, and the lr follows it by the linear
    scaling rule (when it comes from optim.base_lr).
    """
    if world_size == trainer.num_workers:
        return trainer
    micro_batches = trainer.num_workers * trainer.grad_accum
    accum = -(-micro_batches // world_size)
    return dataclasses.replace(trainer, num_workers=world_size, grad_accum=accum)


def peak_lr(optim: OptimConfig, trainer: TrainerConfig) -> float:
    """optim.lr if set, else base_lr * global_batch / 256 (linear scaling rule)."""
    if optim.lr is not None:
        return optim.lr
    assert optim.base_lr is not None  # guaranteed by config validation
    return optim.base_lr * global_batch(trainer) / 256


def follow_schedule(scheduler: Any, optim: OptimConfig, trainer: TrainerConfig) -> None:
    """After a restore: the lr of this run's schedule at the restored step (`scheduler`: our LambdaLR).

    A checkpoint brings back the scheduler's step and its base lr (the peak of the run that
    wrote it); the peak of this run differs when the global batch changed (another worker
    count, elastic or on resume) and optim.lr is not fixed.
    """
    peak = peak_lr(optim, trainer)
    lr = peak * lr_schedule(optim, trainer)(scheduler.last_epoch)
    scheduler.base_lrs = [peak for _ in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["lr"] = lr


def warmup_cosine(step: int, *, total: int, warmup: int, peak: float, floor: float) -> float:
    """lr at optimizer step `step` (0-based): linear warmup to `peak`, half-cosine to `floor`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optim: OptimConfig, trainer: TrainerConfig) -> Callable[[int], float]:
    """Multiplicative factor for torch's LambdaLR (lr = peak * factor)."""
    peak = peak_lr(optim, trainer)
    warmup = int(round(optim.warmup_fraction * trainer.max_steps))

    def factor(step: int) -> float:
        return warmup_cosine(step, total=trainer.max_steps, warmup=warmup, peak=peak, floor=optim.min_lr) / peak

    return factor


def deepspeed_config(ds: DeepSpeedConfig, trainer: TrainerConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for these settings."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": trainer.batch_size,
        "gradient_accumulation_steps": trainer.grad_accum,
        "train_batch_size": global_batch(trainer),
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        # Our optimizer is torch's AdamW or our LARS (param groups are ours); DeepSpeed only shards AdamW.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we report metrics ourselves
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def training_dtype(ds: DeepSpeedConfig) -> torch.dtype:
    """dtype of the engine's parameters (inputs are cast to it)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[ds.precision]


@functools.cache
def fused_adamw_available(device_type: str) -> bool:
    """Whether torch's fused AdamW kernel runs on this device type (probed with one step on one scalar)."""
    probe = torch.zeros(1, device=device_type, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        torch.optim.AdamW([probe], fused=True).step()
    except RuntimeError:  # no fused kernel for this device type
        return False
    return True


def build_optimizer(
    module: nn.Module, optim: OptimConfig, trainer: TrainerConfig, *, allow_fused: bool = True
) -> torch.optim.Optimizer:
    """torch's AdamW on the two parameter groups, fused where the device has the kernel (and allow_fused).

    The fused kernel is faster than torch's per-tensor loop on CPU too (docs/benchmarks.md)
    and computes the same update (tests/pretrain/test_engine.py). optim.name=lars: LARS on the
    same groups, the second (biases, norms) without trust ratio or decay (SimCLR, MoCo v3);
    optim.name=sgd: torch's SGD with momentum on the same groups (RotNet).
    """
    if optim.name == "sgd":
        return torch.optim.SGD(
            param_groups(module, optim.weight_decay),
            lr=peak_lr(optim, trainer),
            momentum=optim.momentum,
            nesterov=optim.nesterov,
        )
    if optim.name == "lars":
        from pretrain.lars import LARS

        decay, no_decay = param_groups(module, optim.weight_decay)
        return LARS(
            [decay, {**no_decay, "adapt": False}],
            lr=peak_lr(optim, trainer),
            momentum=optim.momentum,
            trust_coefficient=optim.trust_coefficient,
        )
    devices = {p.device.type for p in module.parameters() if p.requires_grad}
    fused = allow_fused and len(devices) == 1 and fused_adamw_available(devices.pop())
    return torch.optim.AdamW(
        param_groups(module, optim.weight_decay),
        lr=peak_lr(optim, trainer),
        betas=(optim.betas[0], optim.betas[1]),
        eps=optim.eps,
        fused=fused or None,
    )


def import_deepspeed() -> Any:
    """`import deepspeed` without the MLflow import its autotuner tries (when MLflow is installed)
    at import time: 1.3 cpu-s of DeepSpeed's 1.5 here, in every worker, for autotuning, which runs
    never use. Ranks that log import MLflow themselves when they need it; it stays importable.
    Its Muon module is imported without the TorchInductor set-up it asks for (below)."""
    import sys

    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # an ImportError, which DeepSpeed catches
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    _import_muon_without_compiling()
    return deepspeed


# DeepSpeed's Muon optimizer. ZeRO stages 1-3 import it whatever the optimizer (to tell whether it
# is Muon), and the module wraps its Newton-Schulz kernel in `torch.compile` at import, which sets
# up TorchInductor: 1.9 cpu-s in every worker at every engine build (2-core VM, EPYC family 23),
# for an optimizer runs never use (optim.name: adamw, lars or sgd).
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def _import_muon_without_compiling() -> None:
    """Import DeepSpeed's Muon module with TorchDynamo off for that import alone: its kernel stays a
    plain function (eager, were Muon ever offered here), and nothing else changes (torch.compile
    reads the switch when it is called; later calls compile as usual)."""
    import importlib
    import os
    import sys

    if MUON_MODULE in sys.modules:
        return
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:
        pass  # a DeepSpeed without Muon: nothing to import
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


def build_engine(module: nn.Module, optim: OptimConfig, trainer: TrainerConfig, ds: DeepSpeedConfig) -> Any:
    """deepspeed.initialize on the trainable module with its optimizer (AdamW or LARS) and the lr schedule."""
    deepspeed = import_deepspeed()

    from pretrain.hardware import use_environment_build_tools
    from pretrain.trainer.checkpoint import install_safe_checkpoint_engine

    use_environment_build_tools()  # ninja and extension cache, before DeepSpeed loads its CPU op

    if not ds.force_precision:  # this worker's own device: on a cluster it need not be the driver's host
        from deepspeed.accelerator import get_accelerator

        from pretrain.hardware import device_precision_problem

        problem = device_precision_problem(ds.precision, torch.device(get_accelerator().current_device_name()))
        if problem:
            raise ValueError(f"deepspeed.precision: {problem}")
    optimizer = build_optimizer(module, optim, trainer)
    factor = lr_schedule(optim, trainer)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        # A callable: DeepSpeed builds the scheduler on its own (possibly wrapped) optimizer.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        config=deepspeed_config(ds, trainer),
        dist_init_required=False,
    )
    install_safe_checkpoint_engine(engine)
    if ds.zero_stage == 0 and engine.dp_world_size == 1:
        # One data-parallel rank has nothing to average, yet DeepSpeed would copy every gradient
        # through a flat buffer and all-reduce it with itself (cost: docs/benchmarks.md).
        engine.enable_backward_allreduce = False
    if ds.zero_stage == 3:
        register_bypassed_parameters(engine.module)
    return engine


def register_bypassed_parameters(root: nn.Module) -> None:
    """ZeRO-3: gather parameters of container modules whose forward we bypass.

    ZeRO-3 gathers a module's own parameters when that module's forward runs. The
    backbone adapter uses e.g. the timm ViT's `cls_token`/`pos_embed` without calling
    `VisionTransformer.forward`, so they are registered with the root module, whose
    forward encloses every use.
    """
    import deepspeed

    from objectives.components.zero import container_parameters

    for param in container_parameters(root):
        deepspeed.zero.register_external_parameter(root, param)
