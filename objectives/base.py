"""The objective plug-in contract (see ARCHITECTURE.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from data.needs import DataNeeds, MaskSpec
from objectives.artifacts import model_type
from objectives.components.masking import batch_mask

if TYPE_CHECKING:
    import numpy as np

    from objectives.components.backbone import VitBackbone

__all__ = ["DataNeeds", "ExportedModel", "LossOutput", "MaskSpec", "Objective", "RunContext"]


# ImageNet statistics: the data pipeline's default normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RunContext:
    """What the run tells an objective besides its own config.

    tracking_uri: the MLflow store of the run ("" = none); teachers and tokenizers
    given as `models:/`/`runs:/` URIs resolve against it. input_mean/std: the
    normalisation of the images in a batch. arch/arch_kwargs: the timm call that
    rebuilds the encoder (written beside exported weights). total_steps: the run's
    optimizer steps. inputs: earlier stages' outputs, already loaded.
    """

    tracking_uri: str = ""
    input_mean: tuple[float, ...] = IMAGENET_MEAN
    input_std: tuple[float, ...] = IMAGENET_STD
    arch: str = ""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    # Optimizer steps of the whole run (trainer.max_steps): for schedules such as
    # MoCo v3's momentum; 0 when unknown (direct use outside a run).
    total_steps: int = 0
    # The training image size (model.img_size), recorded with the exported encoder.
    img_size: int = 0
    # Inputs from earlier stages already loaded ({"teacher": Teacher, "tokenizer": VQTokenizer,
    # "centroids": (K, p*p*3) tensor}): used instead of loading what the config names.
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportedModel:
    """An artifact directory (`objectives.artifacts`) an objective wrote at the end of training for a later stage.

    name: the logged model's name in the MLflow run (`runs:/<run_id>/<name>`) and the
    folder under `<run dir>/export/`. kind: the artifact kind ("encoder", "tokenizer",
    "centroids"). registered_name: registry name ("" = not registered);
    `models:/<registered_name>/latest` is the newest version.
    """

    name: str
    path: Path
    kind: str
    registered_name: str = ""
    params: dict[str, str] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        """The MLflow logged-model type ("pretrain.<kind>")."""
        return model_type(self.kind)


class LossOutput(NamedTuple):
    """What `Objective.forward` returns: the scalar to minimise and its own metrics.

    A NamedTuple (not a dataclass) so that DeepSpeed ZeRO-3 sees the tensors in it and
    hooks them for re-gathering parameters in the backward pass.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class Objective(nn.Module):
    """Base class: an objective wraps a backbone and owns everything method-specific.

    Subclasses are registered with `@objectives.registry.register(name, config, views=, mask=)`,
    which sets `name`, `config_class` and the data they need: `views` augmented crops per
    image and, with `mask_kind` ("random" | "block", `data.masks`), a per-sample mask of
    `cfg.mask_ratio`; override `data_needs` for anything else.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    views: ClassVar[int] = 1
    mask_kind: ClassVar[str | None] = None

    def __init__(self, cfg: Any, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.context = context or RunContext()

    @classmethod
    def data_needs(cls, cfg: Any) -> DataNeeds:
        """Views/masks this objective needs from the data pipeline."""
        mask = MaskSpec(cls.mask_kind, cfg.mask_ratio) if cls.mask_kind else None
        return DataNeeds(views=cls.views, mask=mask)

    def batch_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, N) bool mask of a batch (drawn by the data pipeline), or one drawn here for a direct call."""
        spec = self.data_needs(self.cfg).mask
        if spec is None:
            raise ValueError(f"objective {self.name!r} asks the data pipeline for no mask")
        backbone = self.backbone
        return batch_mask(batch, spec, backbone.grid_size, batch["views"][0].device, patch_size=backbone.patch_size)

    def forward(self, batch: dict[str, Any]) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Hook after each optimizer step (EMA, momentum, codebook updates)."""

    def prepare(self, batches: Iterator[dict[str, Any]]) -> None:
        """Hook before the first step of a new run (not on resume), on every rank.

        `batches` is a separate stream of this rank's training batches (same views and
        masks as training; drawing from it does not advance the training data), for
        state built from the data before training, e.g. CCViT's k-means centroids. Keep
        such state in buffers: checkpoints then carry it and a resumed run skips this.
        Under ZeRO-3 parameters are partitioned here; buffers are not.
        """

    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Pictures of what the method sees and predicts: {short_snake_case_name: (H, W, 3) uint8}.

        Called at the end of a run on every rank, under `torch.no_grad()` in eval mode, with one
        training batch as `forward` gets it (on the device, in the training dtype); rank 0 logs
        each as `pictures/<name>.png`. Under ZeRO-3 every rank must run the same modules in the
        same order, so an override never branches on the rank or skips a submodule on the data;
        it runs the model inside `objectives.components.zero.gathered_outside_forward(self)` and uses
        at most the first `objectives.components.pictures.MAX_IMAGES` images. The default draws nothing.
        """
        return {}

    def attach_frozen(self, name: str, module: nn.Module) -> None:
        """Hold a frozen teacher/tokenizer without registering it as a submodule.

        It then stays out of `parameters()`/`state_dict()`, so DeepSpeed neither
        partitions nor checkpoints it; the training loop moves it to the device.
        """
        frozen = self.__dict__.setdefault("_frozen", {})
        frozen[name] = module.eval().requires_grad_(False)

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Frozen teachers/tokenizers: kept outside the DeepSpeed-wrapped module."""
        return dict(self.__dict__.get("_frozen", {}))

    def encoder(self) -> nn.Module:
        """The module exported as the pretrained encoder (a timm model)."""
        return self.backbone.timm_model

    def export(self, out_dir: Path) -> list[ExportedModel]:
        """Write what later stages load; rank 0, after the last step, with full parameters.

        The default exports the encoder as an encoder artifact (timm key names; also loadable
        with timm's `local-dir:`), so `objective.teacher.source=runs:/<run_id>/encoder` makes
        it the teacher of a VQ-KD or MaskDistill run. Objectives that train a tokenizer add it here.
        """
        from objectives.artifacts import save_encoder

        ctx = self.context
        if not ctx.arch:
            return []
        path = save_encoder(
            self.encoder(),
            out_dir / "encoder",
            ctx.arch,
            ctx.arch_kwargs,
            mean=ctx.input_mean,
            std=ctx.input_std,
            img_size=ctx.img_size,
            features=getattr(type(self.cfg), "features", "cls"),
        )
        return [ExportedModel("encoder", path, "encoder", params={"arch": ctx.arch})]
