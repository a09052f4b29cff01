"""Export under ZeRO-3 on two ranks -> timm `create_model` + strict load -> the training-time encoder's features."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from objectives.base import RunContext
from objectives.configs import MAEConfig
from objectives.mae import MAE
from pretrain.backbone import arch_kwargs, build_backbone
from pretrain.config import ModelConfig

MODEL = ModelConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        import deepspeed

        import pretrain.engine
        from pretrain.config import DeepSpeedConfig, OptimConfig, TrainerConfig
        from pretrain.export import encoder_state, export_models

        base_config = pretrain.engine.deepspeed_config

        def partition_everything(ds: DeepSpeedConfig, trainer: TrainerConfig) -> dict:
            config = base_config(ds, trainer)  # tiny tensors are kept whole by default; split them all
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            return config

        pretrain.engine.deepspeed_config = partition_everything
        torch.manual_seed(0)
        context = RunContext(arch=MODEL.arch, arch_kwargs=arch_kwargs(MODEL))
        mae = MAE(MAEConfig(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2), build_backbone(MODEL), context)
        engine = pretrain.engine.build_engine(
            mae,
            OptimConfig(lr=1e-2),
            TrainerConfig(batch_size=4, num_workers=2, max_steps=4),
            DeepSpeedConfig(zero_stage=3),
        )
        vit = engine.module.encoder()
        partitioned = vit.blocks[0].attn.qkv.weight.numel() == 0 and vit.pos_embed.numel() == 0
        gen = torch.Generator().manual_seed(rank)
        for _ in range(2):  # trained weights, not the initial ones
            engine.backward(engine({"views": [torch.randn(4, 3, 16, 16, generator=gen)]}).loss)
            engine.step()
        images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        vit.eval()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            with torch.no_grad():
                features = vit.forward_features(images)  # the training-time encoder, whole
        state = encoder_state(engine, rank=rank)
        exports = export_models(engine, rank=rank, run_dir=out_dir, storage_options=None, tracking_uri="", run_id="")
        if rank == 0:
            assert state is not None and set(exports) == {"encoder"}
            torch.save(
                {"features": features, "images": images, "state": state, "partitioned": torch.tensor(partitioned)},
                f"{out_dir}/rank0.pt",
            )
        else:
            assert state is None and exports == {}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two DeepSpeed engines (and its CPU op build on a fresh machine)
def test_zero3_export_loads_strictly_in_timm_with_identical_features(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Fresh interpreters, not fork: a parent that already ran torch.export (other tests in this
    # process) leaves autograd unusable in forked children.
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(port), str(tmp_path)], cwd=root, env=env)
        for r in range(2)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0]
    saved = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert bool(saved["partitioned"])  # ZeRO-3 really split every parameter: the export had to gather

    export = tmp_path / "export" / "encoder"
    meta = json.loads((export / "pretrain.json").read_text())
    assert meta["kind"] == "encoder" and meta["arch"] == MODEL.arch and meta["arch_kwargs"] == arch_kwargs(MODEL)
    weights = load_file(str(export / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # plain fp32
    model = timm.create_model(meta["arch"], pretrained=False, **meta["arch_kwargs"])
    model.load_state_dict(weights, strict=True)  # timm's own key names, nothing missing or extra
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(saved["images"]), saved["features"], rtol=0, atol=0)
    # timm's own loader reads the same export (its config.json beside the weights).
    by_timm = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_timm.forward_features(saved["images"]), saved["features"], rtol=0, atol=0)
    # The background-evaluation copy is the same weights.
    assert set(saved["state"]) == set(weights)
    for key, value in weights.items():
        torch.testing.assert_close(saved["state"][key], value, rtol=0, atol=0)


if __name__ == "__main__":  # one rank, started by the test above
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
