"""CrossMAE's decoder against MAE's at the same settings: FLOPs, time and memory of the decoder alone.

    python scripts/decoder_cost.py [--model vit_base] [--batch 8] [--steps 5] [--decoder-depth 8 --decoder-dim 512]

Both objectives are built as the workers build them (the same ViT encoder, mask ratio 0.75,
a decoder of `--decoder-depth` blocks of `--decoder-dim` width, 16 heads); CrossMAE
reconstructs 25% of the patches with cross-attention only, MAE all of them with self-attention
over every token. For one batch, the encoder's output is computed once and kept (CrossMAE: every block's output,
its feature weighting counted in the decoder); each decoder then runs forward + backward
`--steps` times after one warm-up, its gradient reaching the encoder's outputs. Printed, in one run:

flops      forward + backward FLOPs of the decoder and its loss (torch.utils.flop_counter)
ms         median wall time of a decoder forward + backward
peak MiB   extra memory of the decoder step (CUDA: allocated; CPU: not measured, "-")

and the ratios CrossMAE / MAE. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def build(objective: str, model: str, depth: int, dim: int):
    from omegaconf import OmegaConf

    from objectives.base import RunContext
    from objectives.registry import get_objective_class
    from pretrain.backbone import build_backbone
    from pretrain.config import ModelConfig

    spec = OmegaConf.to_container(OmegaConf.load(REPO / "pretrain" / "conf" / "model" / f"{model}.yaml"))
    spec.pop("name", None)
    cls = get_objective_class(objective)
    cfg = cls.config_class(decoder_embed_dim=dim, decoder_depth=depth, decoder_num_heads=16)
    torch.manual_seed(0)
    return cls(cfg, build_backbone(ModelConfig(**spec)), RunContext())


def decoder_step(objective: str, model, images: torch.Tensor, mask: torch.Tensor):
    """A closure running the decoder + loss forward and backward on a fixed encoder output."""
    from objectives.components.masking import masking_from_mask
    from objectives.components.patches import masked_patch_mse, normalise_patches, patchify
    from objectives.components.predictor import gather_tokens
    from objectives.crossmae import prediction_subset

    patch = model.backbone.patch_size
    target = patchify(images, patch)
    with torch.no_grad():
        keep_idx = masking_from_mask(mask).keep_idx
        if objective == "mae":
            masking = masking_from_mask(mask)
            latent = model.backbone.encode(model.backbone.embed_patches(images), keep_idx=keep_idx).tokens
        else:  # the encoder's block outputs; the feature weighting runs in the timed step
            out = model.backbone.encode(
                model.backbone.embed_patches(images), keep_idx=keep_idx, return_blocks=range(model.backbone.depth)
            )
            stacked = torch.stack([out.block_outputs[i] for i in range(model.backbone.depth)], dim=-1)
            predicted = prediction_subset(mask, model.num_predicted)
    if objective == "mae":
        latent = latent.detach().requires_grad_(True)

        def run() -> None:
            pred = model.forward_decoder(latent, masking.restore_idx)
            masked_patch_mse(pred, target, masking.mask, True).backward()

    else:
        stacked = stacked.detach().requires_grad_(True)

        def run() -> None:
            pred = model.decode(model.mix(stacked), predicted)
            ((pred - normalise_patches(gather_tokens(target, predicted))) ** 2).mean().backward()

    return run


def measure(run, steps: int, device: torch.device) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    run()  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(steps):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return {"flops": float(counter.get_total_flops()), "ms": 1000 * statistics.median(times), "peak_mib": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="vit_base", help="pretrain/conf/model/ name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--decoder-dim", type=int, default=512)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from data.masks import random_patch_mask

    rows = {}
    for objective in ("mae", "crossmae"):
        model = build(objective, args.model, args.decoder_depth, args.decoder_dim).to(device).train()
        size = model.backbone.grid_size[0] * model.backbone.patch_size
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
        mask = torch.stack([random_patch_mask(model.backbone.grid_size, gen, ratio=0.75) for _ in range(args.batch)])
        rows[objective] = measure(decoder_step(objective, model, images, mask.to(device)), args.steps, device)
        del model
    name = torch.cuda.get_device_name() if device.type == "cuda" else _cpu()
    print(f"device: {name}; {args.model}, batch {args.batch}, decoder {args.decoder_depth} x {args.decoder_dim}")
    print("| decoder | GFLOPs (fwd + bwd) | ms per step | peak MiB |")
    print("|---|---:|---:|---:|")
    for objective, r in rows.items():
        peak = "-" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.0f}"
        print(f"| {objective} | {r['flops'] / 1e9:.1f} | {r['ms']:.1f} | {peak} |")
    mae, cross = rows["mae"], rows["crossmae"]
    print(
        f"crossmae / mae: FLOPs {cross['flops'] / mae['flops']:.3f}, time {cross['ms'] / mae['ms']:.3f}"
        + (f", memory {cross['peak_mib'] / mae['peak_mib']:.3f}" if device.type == "cuda" else "")
    )
    return 0


def _cpu() -> str:
    sys.path.insert(0, str(REPO / "scripts"))
    from methods import host

    return host()


if __name__ == "__main__":
    raise SystemExit(main())
