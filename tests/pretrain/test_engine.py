"""Optimizer groups, lr scaling and schedule, DeepSpeed config: against hand-computed values."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.config import DeepSpeedConfig, OptimConfig, TrainerConfig
from pretrain.engine import (
    build_optimizer,
    deepspeed_config,
    follow_schedule,
    global_batch,
    lr_schedule,
    param_groups,
    peak_lr,
    trainer_for_world,
    warmup_cosine,
)

REPO = Path(__file__).resolve().parents[2]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Parameter(torch.zeros(8, 8), requires_grad=False)


def test_no_weight_decay_for_norms_biases_and_tokens() -> None:
    model = Tiny()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"proj.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "pos_embed",
        "cls_token",
        "mask_token",
        "proj.bias",
        "norm.weight",
        "norm.bias",
    }
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_lr_scaled_by_global_batch_over_256() -> None:
    trainer = TrainerConfig(num_workers=4, batch_size=32, grad_accum=2)
    assert global_batch(trainer) == 256
    assert peak_lr(OptimConfig(base_lr=1.5e-4), trainer) == pytest.approx(1.5e-4)
    assert peak_lr(OptimConfig(base_lr=1.5e-4), TrainerConfig(num_workers=8, batch_size=512)) == pytest.approx(
        1.5e-4 * 16
    )
    assert peak_lr(OptimConfig(base_lr=1.5e-4, lr=3e-3), trainer) == 3e-3


def test_warmup_then_half_cosine() -> None:
    # 10 steps: 2 warmup steps to 1.0, then cosine from 1.0 to 0.1 over 8 steps.
    lrs = [warmup_cosine(s, total=10, warmup=2, peak=1.0, floor=0.1) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # progress 0
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert warmup_cosine(10, total=10, warmup=2, peak=1.0, floor=0.1) == pytest.approx(0.1)
    factor = lr_schedule(
        OptimConfig(base_lr=None, lr=2.0, min_lr=0.2, warmup_fraction=0.2), TrainerConfig(max_steps=10)
    )
    assert [factor(s) * 2.0 for s in range(10)] == pytest.approx(
        [warmup_cosine(s, total=10, warmup=2, peak=2.0, floor=0.2) for s in range(10)]
    )


def test_fewer_workers_accumulate_more_micro_batches() -> None:
    t = TrainerConfig(num_workers=4, batch_size=32, grad_accum=2)  # 8 micro-batches of 32: 256
    assert trainer_for_world(t, 4) is t
    # 2 of 4 workers: 4 micro-batches each; global batch, lr and DeepSpeed's batch arithmetic unchanged.
    two = trainer_for_world(t, 2)
    assert (two.num_workers, two.grad_accum, two.batch_size) == (2, 4, 32)
    assert global_batch(two) == 256 and peak_lr(OptimConfig(base_lr=1e-3), two) == pytest.approx(1e-3)
    ds = deepspeed_config(DeepSpeedConfig(), two)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    # 3 workers cannot share 8 micro-batches: 3 each (9 x 32 = 288), the lr by the linear rule.
    three = trainer_for_world(t, 3)
    assert (three.grad_accum, global_batch(three)) == (3, 288)
    assert peak_lr(OptimConfig(base_lr=1e-3), three) == pytest.approx(1e-3 * 288 / 256)
    assert peak_lr(OptimConfig(base_lr=None, lr=2e-3), three) == 2e-3  # a fixed lr stays fixed


def test_a_restored_schedule_follows_this_runs_peak() -> None:
    # A checkpoint's scheduler state carries the writer's peak (base_lrs); after 3 steps at peak 0.1,
    # a run whose global batch is 2x (peak 0.2 by the linear rule) must be at 0.2 x factor(3).
    optim = OptimConfig(base_lr=0.1 * 256 / 64, warmup_fraction=0.2, min_lr=0.0)

    def scheduler(trainer: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak_lr(optim, trainer))
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(optim, trainer))

    small, large = (
        TrainerConfig(num_workers=1, batch_size=64, max_steps=10),
        TrainerConfig(num_workers=2, batch_size=64, max_steps=10),
    )
    writer = scheduler(small)
    for _ in range(3):
        writer.optimizer.step()
        writer.step()
    reader = scheduler(large)
    reader.load_state_dict(writer.state_dict())
    assert reader.base_lrs == pytest.approx([0.1])  # the writer's peak came back with the state
    follow_schedule(reader, optim, large)
    expected = warmup_cosine(3, total=10, warmup=2, peak=0.2, floor=0.0)
    assert reader.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    reader.optimizer.step()
    reader.step()
    after = warmup_cosine(4, total=10, warmup=2, peak=0.2, floor=0.0)
    assert reader.optimizer.param_groups[0]["lr"] == pytest.approx(after)
    # Same peak: a no-op.
    same = scheduler(small)
    same.load_state_dict(writer.state_dict())
    follow_schedule(same, optim, small)
    assert same.optimizer.param_groups[0]["lr"] == pytest.approx(writer.optimizer.param_groups[0]["lr"])


def test_fused_adamw_on_cpu_matches_the_reference_loop() -> None:
    # build_optimizer picks torch's fused kernel where the device has one (the CPU does); its
    # updates must be those of torch's per-tensor reference loop, groups and decay included.
    optim, trainer = OptimConfig(base_lr=None, lr=0.01, weight_decay=0.05), TrainerConfig()
    torch.manual_seed(0)
    fused_model, loop_model = Tiny(), Tiny()
    loop_model.load_state_dict(fused_model.state_dict())
    start = fused_model.proj.weight.detach().clone()
    fused = build_optimizer(fused_model, optim, trainer)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(
        param_groups(loop_model, optim.weight_decay), lr=0.01, betas=tuple(optim.betas), eps=optim.eps, foreach=False
    )
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=g)
                b.grad = a.grad.clone()
        fused.step()
        loop.step()
    torch.testing.assert_close(dict(fused_model.named_parameters()), dict(loop_model.named_parameters()))
    assert (fused_model.proj.weight - start).abs().min() > 0  # every weight moved


@pytest.mark.parametrize(("precision", "key"), [("fp32", None), ("bf16", "bf16"), ("fp16", "fp16")])
def test_deepspeed_config(precision: str, key: str | None) -> None:
    trainer = TrainerConfig(num_workers=2, batch_size=16, grad_accum=4)
    config = deepspeed_config(DeepSpeedConfig(zero_stage=3, precision=precision, grad_clip=3.0), trainer)
    assert config["train_batch_size"] == 128
    assert config["train_micro_batch_size_per_gpu"] == 16 and config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"]["stage"] == 3 and config["gradient_clipping"] == 3.0
    assert ("bf16" in config) == (key == "bf16") and ("fp16" in config) == (key == "fp16")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_peak_memory_covers_a_touched_allocation() -> None:
    # The peak may lie above the current resident size (import transients): compare with the latter.
    code = (
        "import os, torch; from pretrain.trainer.metrics import peak_memory_gb; cpu = torch.device('cpu');"
        "rss = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30;"
        "before = peak_memory_gb(cpu); block = torch.ones(512 * 2**20 // 4);"  # 512 MiB, written
        "print(rss, before, peak_memory_gb(cpu))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    rss, before, after = map(float, out.stdout.split())
    assert 0.05 < rss <= before + 0.01  # a Python process with torch loaded; the peak is at least that
    assert rss + 0.49 <= after <= max(before, rss + 0.5) + 0.1, (rss, before, after)


# --- real DeepSpeed ZeRO-0 engines (gloo, CPU accelerator, forked ranks) against plain torch ----------


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.norm(self.proj(x)) - y) ** 2).mean()


OPTIM = OptimConfig(base_lr=None, lr=0.05, weight_decay=0.05, warmup_fraction=0.0)
CLIP, STEPS, BATCH = 0.1, 3, 6  # the clip is below every step's gradient norm: it always acts


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 4, generator=g)


def _zero0_rank(rank: int, world: int, out_dir: str) -> None:
    from pretrain.engine import build_engine

    torch.manual_seed(0)
    trainer = TrainerConfig(num_workers=world, batch_size=BATCH, max_steps=STEPS)
    engine = build_engine(Regressor(), OPTIM, trainer, DeepSpeedConfig(zero_stage=0, grad_clip=CLIP))
    grads = []
    for step in range(STEPS):
        engine.backward(engine(*_batch(rank, step)))
        grads.append({n: p.grad.detach().clone() for n, p in engine.module.named_parameters()})
        engine.step()
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    result = {"allreduce": engine.enable_backward_allreduce, "grads": grads, "params": params}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize("world", [1, 2])
def test_zero0_step_equals_plain_torch(tmp_path: Path, world: int, gloo_ranks) -> None:
    # One rank skips DeepSpeed's gradient all-reduce (a copy of every gradient through a flat
    # buffer and back); two ranks keep it. Both must match plain torch on the mean loss over
    # the ranks' batches: the same gradients, the same clipping, the same AdamW updates (the
    # engine's fused kernel against torch's per-tensor loop).
    gloo_ranks(_zero0_rank, world, world, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world)]
    assert [r["allreduce"] for r in results] == [world > 1] * world

    torch.manual_seed(0)
    model = Regressor()
    trainer = TrainerConfig(num_workers=world, batch_size=BATCH, max_steps=STEPS)
    optimizer = torch.optim.AdamW(
        param_groups(model, OPTIM.weight_decay), lr=peak_lr(OPTIM, trainer), betas=(0.9, 0.95), eps=OPTIM.eps
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(OPTIM, trainer))
    for step in range(STEPS):
        loss = sum(model(*_batch(rank, step)) for rank in range(world)) / world
        loss.backward()
        for result in results:
            torch.testing.assert_close(result["grads"][step], {n: p.grad for n, p in model.named_parameters()})
        assert float(nn.utils.clip_grad_norm_(model.parameters(), CLIP)) > CLIP
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    for result in results:
        torch.testing.assert_close(result["params"], dict(model.named_parameters()))


def test_deepspeed_is_imported_without_mlflow_or_inductor_and_both_stay_usable() -> None:
    # In a fresh interpreter (this one has MLflow loaded): DeepSpeed's autotuner tries MLflow at
    # import time; the engine's import skips that, and MLflow imports normally afterwards. ZeRO 1-3
    # import DeepSpeed's Muon module, whose kernel asks torch.compile for TorchInductor at import:
    # imported beforehand with TorchDynamo off for that import alone, then torch.compile works.
    probe = (
        "import os, sys, types\n"
        "from pretrain.engine import MUON_MODULE, import_deepspeed\n"
        "import_deepspeed()\n"
        "from deepspeed.autotuning import autotuner\n"
        "print('mlflow' in sys.modules, autotuner.has_mlflow, 'mlflow' in sys.modules)\n"
        "import mlflow\n"
        "print(mlflow.MlflowClient.__name__)\n"
        "from deepspeed.runtime.zero.muon import original_muon\n"
        "kernel = original_muon.zeropower_via_newtonschulz5\n"
        "print(MUON_MODULE in sys.modules, type(kernel) is types.FunctionType and not hasattr(kernel, '_torchdynamo_orig_callable'),\n"
        "      any(m.startswith('torch._inductor.compile_fx') for m in sys.modules), 'TORCHDYNAMO_DISABLE' in os.environ)\n"
        "import torch\n"
        "def twice(x):\n"
        "    return x * 2\n"
        "compiled = torch.compile(twice, backend='eager')\n"
        "print(compiled is not twice, compiled(torch.ones(3)).tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-4:] == [  # after DeepSpeed's own lines
        "False False False",
        "MlflowClient",
        "True True False False",
        "True [2.0, 2.0, 2.0]",
    ], done.stdout[-2000:]
