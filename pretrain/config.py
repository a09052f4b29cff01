"""Typed config schema (Hydra structured configs) and its validation.

Torch-free on purpose: `python -m pretrain.run` validates a config and reports the
first mistake in well under a second, before torch, Ray or MLflow are imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from data.config import DATA_SCHEMES, STORAGE_SCHEMES, DataConfig, data_problems, unsupported_scheme
from data.config import url_scheme as url_scheme  # re-exported: launch.py uses it
from objectives.configs import ObjectiveConfig, objective_config_classes
from pretrain.hardware import cpu_bf16_problem

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    """A timm model and the overrides applied when creating it."""

    # Short name of this model option (the registry name is <objective>-<name>).
    name: str = ""
    # timm model name (timm.list_models()): a ViT, or any timm model for the objectives that
    # need only pooled features (simclr, mocov3).
    arch: str = "vit_base_patch16_224"
    # vit | resnet | convnext | swin | other; "auto" reads it from the arch name (model_family).
    family: str = "auto"
    # Input size; ViTs are built for it, other families take any size.
    img_size: int = 224
    # ViT only, like embed_dim, depth and num_heads (None keeps the architecture's own value).
    patch_size: int = 16
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    # More timm.create_model arguments, e.g. a Swin's window_size, depths and num_heads lists.
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.0
    # Load timm's pretrained weights (needs network access to the hub).
    pretrained: bool = False
    # timm's fused attention (F.scaled_dot_product_attention) instead of its explicit
    # softmax(QK^T)V; same math. "auto": fused, except in bf16 on a CPU, where PyTorch's
    # fused CPU kernel is the slower one (docs/benchmarks.md). true / false force it everywhere.
    fused_attn: bool | str = "auto"


OPTIMIZERS = ("adamw", "lars", "sgd")


@dataclass
class OptimConfig:
    """AdamW (or LARS, SGD) + linear warmup + cosine decay, per optimizer step."""

    # adamw: torch AdamW (every ViT recipe here). lars: SGD + momentum with a per-tensor trust
    # ratio (pretrain/lars.py), the ResNet recipes of SimCLR and MoCo v3; it needs
    # deepspeed.zero_stage=0 and fp32 (ZeRO and DeepSpeed's bf16/fp16 wrappers hand the
    # optimizer flattened partitions, and the trust ratio is per tensor). sgd: torch SGD with
    # `momentum` (and `nesterov`), elementwise, so any ZeRO stage (RotNet's recipe).
    name: str = "adamw"
    # lr = base_lr * global_batch / 256 (Goyal et al. linear scaling, as MAE/BEiT do).
    base_lr: float | None = 1.5e-4
    # Absolute lr; when set it wins over base_lr.
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # Warmup length as a fraction of trainer.max_steps (MAE: 40 of 800 epochs = 0.05).
    warmup_fraction: float = 0.05
    # LARS and SGD: momentum; LARS: the trust coefficient eta (both recipes: 0.9 and 0.001);
    # SGD: Nesterov momentum.
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    nesterov: bool = False


@dataclass
class DeepSpeedConfig:
    """What goes into the DeepSpeed config dict."""

    zero_stage: int = 0
    precision: str = "fp32"
    # Gradient-norm clipping; 0 disables (MAE uses none).
    grad_clip: float = 0.0
    # A precision the hardware cannot run natively (bf16 on a CPU without avx512_bf16/amx_bf16,
    # or on a GPU before compute capability 8.0) is refused before anything starts; true runs it
    # anyway (emulated, ~300x slower than fp32 on an AVX2-only CPU: pretrain/hardware.py).
    force_precision: bool = False


@dataclass
class TrainerConfig:
    """Ray Train scaling, run length, checkpointing and fault tolerance."""

    num_workers: int = 2
    # Elastic: Ray Train runs between min_workers and num_workers workers, as many as the
    # cluster has room for, and resizes after a node is lost or added (0 = exactly
    # num_workers). Fewer workers keep the global batch by accumulating more micro-batches
    # (docs/cluster.md#losing-nodes).
    min_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # Micro-batch per worker; global batch = batch_size * num_workers * grad_accum.
    batch_size: int = 64
    grad_accum: int = 1
    max_steps: int = 300
    log_every: int = 10
    # The objective's pictures of one fixed batch (the run's first) every this many steps,
    # logged with their step so the MLflow UI shows them change; 0 = only at the end.
    pictures_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # Ray Train retries of the whole worker group after a failure (-1 = unlimited).
    max_failures: int = 0
    # Where Ray Train keeps checkpoints: a local dir or any fsspec URL (s3://...).
    # "" = ./runs in the working directory.
    storage_path: str = ""
    # Bit-reproducible CPU runs (torch.use_deterministic_algorithms); slower.
    deterministic: bool = False
    # A step whose loss is NaN/inf on any rank is skipped (no update) and counted in
    # train/nonfinite_skipped; this many in a row stop the run (the checkpoints stay good).
    max_nonfinite_steps: int = 5
    # torch.compile the objective module (in place: checkpoints and exports keep their
    # names). Compiling costs time on first use; see docs/benchmarks.md.
    compile: bool = False


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    # "" = sqlite store under the storage path (registry works); or http(s)://host:port.
    uri: str = ""
    experiment: str = "pretrain"
    enabled: bool = True
    # Register the encoder at the end of a run in the MLflow model registry.
    register: bool = True
    # Registered-model name ("" = <objective>-<model.name>, e.g. mae-vit_base).
    registered_model: str = ""


# What an MLflow tracking URI (and the model registry beside it) can be.
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")

EVAL_PROTOCOLS = ("knn", "linear")
EVAL_FEATURES = ("auto", "cls", "mean")


@dataclass
class EvalConfig:
    """Frozen-feature evaluation of an encoder: weighted kNN and a linear probe (the `eval` group).

    Fit on labelled shards (`fit_urls`), accuracy on held-out ones (`test_urls`); both
    empty = the embedded default (fit on its train split, test on its held-out eval split).
    """

    # At the end of pretraining (pretrain.run); pretrain.evaluate always evaluates.
    enabled: bool = True
    # Also every N optimizer steps, as a Ray task beside training (0 = only at the end).
    every_steps: int = 0
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    # Labelled shards (.cls): manifest URL or brace pattern. "" = see the class docstring.
    fit_urls: str = ""
    # "" = data.eval_urls, else the embedded default's eval split. When fit_urls is ""
    # but test_urls is not, a deterministic `holdout_fraction` of it (by sample key) is
    # tested and the rest fitted.
    test_urls: str = ""
    holdout_fraction: float = 0.2
    # Caps on the samples read (0 = all), taken in shard order.
    max_fit_samples: int = 0
    max_test_samples: int = 0
    # kNN: cosine on l2-normalised features, k neighbours, votes exp(sim / T) (DINO, Caron et al. 2021).
    k: int = 20
    temperature: float = 0.07
    # Linear probe: standardised features (MAE's BatchNorm without affine) + logistic
    # regression, weight decay picked on a split of the fit set (CLIP-style sweep).
    probe_weight_decays: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    # "cls" token or "mean" of the patch tokens, after the final norm (a ViT; other models give
    # timm's pooled features). "auto": what the encoder's export records (its objective's
    # representation: mean for I-JEPA, which trains no CLS token), else cls.
    features: str = "auto"
    # Eval transform: resize the short side to img_size / crop_pct, centre crop (timm's 0.875).
    crop_pct: float = 0.875
    batch_size: int = 256
    num_workers: int = 1
    # Also evaluate a randomly initialised encoder of the same architecture.
    baseline: bool = True
    # Which result moves the registry alias `best` (only when it beats the holder and its own random init).
    select_metric: str = "knn_top1"
    seed: int = 0
    # Resources of the evaluation Ray task (pretrain.run).
    num_cpus: float = 1.0
    num_gpus: float = 0.0


PIPELINE_RESOLVE = ("auto", "never")


@dataclass
class PipelineConfig:
    """Multi-stage recipes: inputs left to `stage:<objective>` (pretrain/pipeline.py, docs/pipelines.md)."""

    # "auto": such an input is the newest compatible registered version (its `best` first),
    # else its stage is trained first; "never": it is a config error, as without pipelines.
    resolve: str = "auto"
    # Print the plan (stages, where each input comes from, what gets registered) and exit.
    dry_run: bool = False
    # A stage whose last run with the same settings failed is resumed from its last checkpoint.
    resume_failed: bool = True


@dataclass
class PretrainConfig:
    """The whole tree composed by `python -m pretrain.run`."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    # Ray Train run name ("" = <objective>-<model>-<timestamp>).
    name: str = ""
    # Continue a run: its name (under trainer.storage_path) or its directory/URL.
    resume: str = ""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # The preset this config was composed with (each preset YAML sets it; "none" = the paper
    # recipe). Without `preset=` on the command line, a <objective>_cpu preset applies only to
    # the CPU-sized model without GPUs (pretrain.compose); `force_preset=true` lets an explicit
    # CPU preset run on GPUs or a larger model.
    preset_name: str = "none"
    force_preset: bool = False
    # Settings of earlier stages, by objective: stages.<objective>.<key>=<value> (e.g.
    # stages.mae.trainer.max_steps=50, stages.vqkd.model=vit_tiny); the rest of the command
    # line applies to every stage, except objective.*, optim.*, name and tracking.registered_model.
    stages: dict[str, Any] = field(default_factory=dict)


Check = tuple[bool, str, str]  # (holds, key, message if it does not)

# The CPU presets are sized for the demo model (vit_nano: 32 px inputs); a model with larger
# inputs, or GPUs, gets the paper recipe unless a CPU preset is asked for and forced.
CPU_PRESET_MAX_IMG_SIZE = 64


def cpu_preset_misfit(preset: str, model: ModelConfig, use_gpu: bool) -> str:
    """Why a CPU preset does not fit this model and hardware ("" where it fits or is no CPU preset)."""
    if not preset.endswith("_cpu"):
        return ""
    if use_gpu:
        return "trainer.use_gpu=true"
    if model.img_size > CPU_PRESET_MAX_IMG_SIZE:
        return f"model {model.name or model.arch} at {model.img_size} px (the CPU presets are sized for <= {CPU_PRESET_MAX_IMG_SIZE} px)"
    return ""


# `ray job submit` (and KubeRay's RayJob, which submits through the same job server) start
# the entrypoint with this variable set: the driver runs in the job's temporary directory.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_ray_job(environ: Any = None) -> bool:
    """Whether this process is a submitted Ray job's entrypoint."""
    return RAY_JOB_ENV in (os.environ if environ is None else environ)


def node_local_storage_problems(cfg: Any, where: str) -> list[tuple[str, str]]:
    """Checkpoints and the tracking store on one node's disk, where they must outlive the job or node.

    where: "inside a Ray job" or "on a Ray cluster of N nodes". Both fixes can come from the
    environment (PRETRAIN_STORAGE_PATH, MLFLOW_TRACKING_URI: `scripts/stack.sh env` and the
    cluster YAMLs export them).
    """
    found = []
    path = cfg.trainer.storage_path
    if url_scheme(path) == "file":
        shown = path or "./runs (the default)"
        found.append(
            (
                "trainer.storage_path",
                f"{shown} is on one node's disk {where}: checkpoints would be lost with the job's working "
                "directory or node and resume= could not find them; set trainer.storage_path=s3://<bucket>/runs "
                "(or PRETRAIN_STORAGE_PATH)",
            )
        )
    uri = cfg.tracking.uri
    if cfg.tracking.enabled and (not uri or url_scheme(uri) in ("file", "sqlite")):
        shown = uri or "a sqlite store beside the runs (the default)"
        found.append(
            (
                "tracking.uri",
                f"{shown} is on one node's disk {where}; set tracking.uri=http://<mlflow server> "
                "(or MLFLOW_TRACKING_URI, or tracking=server)",
            )
        )
    return found


def missing_eval_data(cfg: Any) -> str:
    """Why the end-of-run evaluation is skipped: the user's training data without labelled eval data.

    The embedded demo shapes are the evaluation data only for the embedded training data; on a
    user's images they would score an unrelated task and could move the alias `best`.
    """
    if not cfg.eval.enabled or not cfg.data.urls or cfg.eval.fit_urls or cfg.eval.test_urls or cfg.data.eval_urls:
        return ""
    return (
        "evaluation skipped: data.urls is your data and no labelled evaluation data is given "
        "(eval.test_urls, eval.fit_urls or data.eval_urls: .cls shards); the alias best stays where it is"
    )


def recipe_line(cfg: Any) -> str:
    """Which recipe a run trains with, for its first log line."""
    name = cfg.objective.name
    where = f"pretrain/conf/objective/{name}.yaml, optim/{name}.yaml"
    if cfg.preset_name == "none":
        return f"recipe: {name} on {cfg.model.name or cfg.model.arch}, the paper recipe ({where})"
    forced = (
        ", forced" if cfg.force_preset and cpu_preset_misfit(cfg.preset_name, cfg.model, cfg.trainer.use_gpu) else ""
    )
    return (
        f"recipe: {name} on {cfg.model.name or cfg.model.arch} with the CPU preset {cfg.preset_name}{forced} "
        f"(pretrain/conf/preset/{cfg.preset_name}.yaml over {where}); preset=none trains the paper recipe"
    )


def preset_problems(cfg: Any) -> list[tuple[str, str]]:
    """A CPU preset (small decoder, CPU learning rate) on GPUs or a large model, unless forced."""
    misfit = cpu_preset_misfit(cfg.preset_name, cfg.model, cfg.trainer.use_gpu)
    if not misfit or cfg.force_preset:
        return []
    return [
        (
            "preset",
            f"{cfg.preset_name} is a CPU preset (pretrain/conf/preset/{cfg.preset_name}.yaml: smaller sizes, "
            f"the CPU learning rate), not meant for {misfit}; use preset=none (the paper recipe) or force_preset=true",
        )
    ]


def failed(checks: list[Check]) -> list[tuple[str, str]]:
    """The (key, message) of every check that does not hold, in order."""
    return [(key, message) for holds, key, message in checks if not holds]


def at_least(section: str, cfg: Any, minimum: float, *keys: str) -> list[Check]:
    """`<section>.<key> >= minimum` for each key."""
    return [
        (getattr(cfg, k) >= minimum, f"{section}.{k}", f"must be >= {minimum}, got {getattr(cfg, k)}") for k in keys
    ]


def trainer_problems(t: TrainerConfig) -> list[tuple[str, str]]:
    """Scaling, run length, checkpoints and storage."""
    keys = ("num_workers", "batch_size", "grad_accum", "max_steps", "log_every", "checkpoint_every")
    bad_storage = unsupported_scheme(t.storage_path, STORAGE_SCHEMES) if t.storage_path else None
    return failed(
        [
            *at_least("trainer", t, 1, *keys, "keep_checkpoints"),
            *at_least("trainer", t, -1, "max_failures"),
            *at_least("trainer", t, 0, "pictures_every"),
            *at_least("trainer", t, 1, "max_nonfinite_steps"),
            (
                0 <= t.min_workers <= t.num_workers,
                "trainer.min_workers",
                f"must be 0 (fixed size) or 1..trainer.num_workers={t.num_workers}, got {t.min_workers}",
            ),
            (t.cpus_per_worker > 0, "trainer.cpus_per_worker", f"must be > 0, got {t.cpus_per_worker}"),
            (
                not t.use_gpu or t.gpus_per_worker > 0,
                "trainer.gpus_per_worker",
                f"must be > 0 with trainer.use_gpu=true, got {t.gpus_per_worker}",
            ),
            (bad_storage is None, "trainer.storage_path", bad_storage or ""),
        ]
    )


def tracking_problems(tracking: TrackingConfig) -> list[tuple[str, str]]:
    """The tracking URI's scheme (a bare path is a local file store)."""
    uri = tracking.uri
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    valid = ", ".join(TRACKING_SCHEMES)
    return failed(
        [
            (
                scheme in TRACKING_SCHEMES,
                "tracking.uri",
                f"unsupported scheme {scheme!r} in {uri!r}; valid schemes: {valid}",
            )
        ]
    )


# timm architecture name prefixes of each backbone family (the rest: "other").
FAMILY_PREFIXES = {
    "vit": ("vit_", "deit_", "deit3_", "eva02_", "beit_", "beitv2_", "flexivit_", "samvit_"),
    "resnet": ("resnet", "resnext", "wide_resnet", "seresne", "ecaresnet", "resnetv2_"),
    "convnext": ("convnext",),
    "swin": ("swin",),
}
FAMILIES = (*FAMILY_PREFIXES, "other")
# The model options (pretrain/conf/model/) of each family, named in errors: a CPU one first.
FAMILY_MODELS = {
    "vit": "vit_nano, vit_base",
    "resnet": "resnet18, resnet50",
    "convnext": "convnextv2_nano_32, convnextv2_base, convnext_atto",
    "swin": "swin_nano, swin_base_192",
}


def model_family(m: ModelConfig) -> str:
    """The backbone family of model.arch (model.family unless "auto"): vit, resnet, convnext, swin or other."""
    if m.family != "auto":
        return m.family
    for family, prefixes in FAMILY_PREFIXES.items():
        if m.arch.startswith(prefixes):
            return family
    return "other"


# A ConvNeXt's stem is a patchify convolution of this stride (timm's default), then three 2x downsamplings.
CONVNEXT_STEM_STRIDE = 4


def mask_unit(m: ModelConfig) -> int:
    """Pixels per cell of the grid the data pipeline draws masks on: a ViT's or Swin's patch; a
    ConvNeXt's final stride (its stem stride x 8: FCMAE masks 32-px regions at the standard stem)."""
    if model_family(m) == "convnext":
        return int(dict(m.kwargs).get("patch_size", CONVNEXT_STEM_STRIDE)) * 8
    return m.patch_size


def backbone_problems(cfg: Any) -> list[tuple[str, str]]:
    """An objective on a backbone family it does not run on (e.g. masking patch tokens of a CNN)."""
    accepted = getattr(type(cfg.objective), "families", ("vit",))
    family = model_family(cfg.model)
    if family not in FAMILIES:  # reported by model_problems
        return []
    found = list(cfg.objective.backbone_problems(family)) if hasattr(cfg.objective, "backbone_problems") else []
    if "any" in accepted or family in accepted:
        return found
    models = "; ".join(f"{f}: model={FAMILY_MODELS[f]}" for f in accepted if f in FAMILY_MODELS)
    anywhere = ", ".join(sorted(c().name for c in objective_config_classes() if "any" in c.families))
    return found + [
        (
            "model.arch",
            f"objective {cfg.objective.name} runs on {' or '.join(accepted)} backbones ({models}), and "
            f"{cfg.model.arch} is a {family}; objectives on any timm model: {anywhere}",
        )
    ]


def model_problems(m: ModelConfig) -> list[tuple[str, str]]:
    """Sizes that timm would refuse later, and the attention switch."""
    checks = at_least("model", m, 1, "img_size", "patch_size")
    checks.append(
        (
            m.family == "auto" or m.family in FAMILIES,
            "model.family",
            f"unknown family {m.family!r}; valid choices: auto, {', '.join(FAMILIES)}",
        )
    )
    if m.img_size >= 1 and m.patch_size >= 1 and model_family(m) in ("vit", "swin"):
        checks.append(
            (
                m.img_size % m.patch_size == 0,
                "model.img_size",
                f"{m.img_size} is not a multiple of model.patch_size={m.patch_size}",
            )
        )
    if m.img_size >= 1 and model_family(m) == "convnext" and m.img_size % mask_unit(m):
        checks.append(
            (
                False,
                "model.img_size",
                f"{m.img_size} is not a multiple of the ConvNeXt's final stride {mask_unit(m)} (stem stride x 8)",
            )
        )
    if m.embed_dim is not None and m.num_heads:
        checks.append(
            (
                m.embed_dim % m.num_heads == 0,
                "model.num_heads",
                f"{m.num_heads} does not divide model.embed_dim={m.embed_dim}",
            )
        )
    checks += [
        (0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", f"must be in [0, 1), got {m.drop_path_rate}"),
        (
            isinstance(m.fused_attn, bool) or m.fused_attn == "auto",
            "model.fused_attn",
            f"must be true, false or auto, got {m.fused_attn!r}",
        ),
    ]
    return failed(checks)


def engine_problems(ds: DeepSpeedConfig, o: OptimConfig, use_gpu: bool) -> list[tuple[str, str]]:
    """DeepSpeed's stage, precision and clipping; the optimizer recipe."""
    betas = list(o.betas)
    # GPU workers check their own device when they build the engine (pretrain/engine.py).
    emulated = cpu_bf16_problem() if ds.precision == "bf16" and not (use_gpu or ds.force_precision) else ""
    return failed(
        [
            (ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be one of 0, 1, 2, 3; got {ds.zero_stage}"),
            (
                ds.precision in PRECISIONS,
                "deepspeed.precision",
                f"unknown precision {ds.precision!r}; valid choices: {', '.join(PRECISIONS)}",
            ),
            (
                ds.precision != "fp16" or use_gpu,
                "deepspeed.precision",
                "fp16 needs trainer.use_gpu=true (CPU training supports fp32 and bf16)",
            ),
            (not emulated, "deepspeed.precision", emulated),
            (ds.grad_clip >= 0, "deepspeed.grad_clip", f"must be >= 0, got {ds.grad_clip}"),
            (
                o.lr is not None or o.base_lr is not None,
                "optim.base_lr",
                "set optim.base_lr (scaled by global batch / 256) or optim.lr (absolute)",
            ),
            *[
                (getattr(o, k) is None or getattr(o, k) > 0, f"optim.{k}", f"must be > 0, got {getattr(o, k)}")
                for k in ("lr", "base_lr")
            ],
            (
                len(betas) == 2 and all(0 <= b < 1 for b in betas),
                "optim.betas",
                f"need two values in [0, 1), got {betas}",
            ),
            (0.0 <= o.warmup_fraction < 1.0, "optim.warmup_fraction", f"must be in [0, 1), got {o.warmup_fraction}"),
            (o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}"),
            (
                o.name in OPTIMIZERS,
                "optim.name",
                f"unknown optimizer {o.name!r}; valid choices: {', '.join(OPTIMIZERS)}",
            ),
            (
                o.name != "lars" or (ds.zero_stage == 0 and ds.precision == "fp32"),
                "optim.name",
                f"lars needs deepspeed.zero_stage=0 and deepspeed.precision=fp32 (got {ds.zero_stage}, {ds.precision}): "
                "its trust ratio is per weight tensor, and ZeRO and DeepSpeed's bf16/fp16 optimizers hand the "
                "optimizer flattened partitions",
            ),
            (0.0 <= o.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {o.momentum}"),
            (o.trust_coefficient > 0, "optim.trust_coefficient", f"must be > 0, got {o.trust_coefficient}"),
            (not o.nesterov or o.momentum > 0, "optim.nesterov", "needs optim.momentum > 0"),
        ]
    )


def find_problems(cfg: Any) -> list[tuple[str, str]]:
    """All config mistakes that can be found without torch: (key, message) pairs, the first one first."""
    found = trainer_problems(cfg.trainer) + tracking_problems(cfg.tracking) + model_problems(cfg.model)
    found += data_problems(cfg.data)
    found += engine_problems(cfg.deepspeed, cfg.optim, cfg.trainer.use_gpu)
    found += eval_problems(cfg.eval)
    found += preset_problems(cfg)
    found += backbone_problems(cfg)
    if in_ray_job():
        found += node_local_storage_problems(cfg, "inside a Ray job")
    if cfg.eval.every_steps and not cfg.eval.enabled:
        found.append(("eval.every_steps", "needs eval.enabled=true"))
    problems = getattr(cfg.objective, "problems", None)
    if problems is not None:
        found.extend(problems())
    found += pipeline_problems(cfg)
    return found


def pipeline_problems(cfg: Any) -> list[tuple[str, str]]:
    """Inputs given as `stage:<objective>`: a known producer of the right kind, and resolution on."""
    from objectives.configs import TOKENIZER_REQUIRED, stage_of

    pipeline = getattr(cfg, "pipeline", None) or PipelineConfig()
    if pipeline.resolve not in PIPELINE_RESOLVE:
        return [("pipeline.resolve", f"must be one of {', '.join(PIPELINE_RESOLVE)}, got {pipeline.resolve!r}")]
    found = []
    producers = objective_outputs()
    for item in getattr(cfg.objective, "inputs", list)():
        stage = stage_of(item.value)
        if not stage and not item.value.startswith("stage:"):
            continue
        makers = sorted(name for name, kinds in producers.items() if item.kind in kinds)
        if stage not in producers or item.kind not in producers[stage]:
            article = "an" if item.kind[0] in "aeiou" else "a"
            found.append(
                (item.key, f"stage:{stage} does not produce {article} {item.kind}; stages that do: {', '.join(makers)}")
            )
        elif pipeline.resolve == "never":
            required = (
                TOKENIZER_REQUIRED
                if item.role == "tokenizer"
                else f"required: a {item.role} (models:/..., runs:/..., a directory, or timm:<name>)"
            )
            found.append((item.key, f"{required} (pipeline.resolve=never leaves {item.value} unresolved)"))
    return found


def objective_outputs() -> dict[str, tuple[str, ...]]:
    """{objective name: artifact kinds its runs export}."""
    from objectives import configs

    found = {}
    for cls in vars(configs).values():
        if isinstance(cls, type) and issubclass(cls, configs.ObjectiveConfig) and cls is not configs.ObjectiveConfig:
            found[cls().name] = cls().outputs()
    return found


def metric_names(protocols: list[str]) -> list[str]:
    """Result keys of the evaluation protocols (`knn` -> knn_top1)."""
    return [f"{p}_top1" for p in protocols]


def eval_problems(e: EvalConfig) -> list[tuple[str, str]]:
    """Mistakes in the `eval` node: (key, message) pairs."""
    found: list[tuple[str, str]] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            found.append((f"eval.{key}", message))

    unknown = [p for p in e.protocols if p not in EVAL_PROTOCOLS]
    need(
        bool(e.protocols) and not unknown,
        "protocols",
        f"unknown protocol(s) {unknown or list(e.protocols)}; valid choices: {', '.join(EVAL_PROTOCOLS)}",
    )
    need(
        e.features in EVAL_FEATURES,
        "features",
        f"unknown features {e.features!r}; valid choices: {', '.join(EVAL_FEATURES)}",
    )
    need(e.every_steps >= 0, "every_steps", f"must be >= 0, got {e.every_steps}")
    need(e.k >= 1, "k", f"must be >= 1, got {e.k}")
    need(e.temperature > 0, "temperature", f"must be > 0, got {e.temperature}")
    need(0.0 < e.holdout_fraction < 1.0, "holdout_fraction", f"must be in (0, 1), got {e.holdout_fraction}")
    need(0.0 < e.crop_pct <= 1.0, "crop_pct", f"must be in (0, 1], got {e.crop_pct}")
    need(e.batch_size >= 1, "batch_size", f"must be >= 1, got {e.batch_size}")
    need(e.num_workers >= 0, "num_workers", f"must be >= 0, got {e.num_workers}")
    need(e.max_fit_samples >= 0, "max_fit_samples", f"must be >= 0, got {e.max_fit_samples}")
    need(e.max_test_samples >= 0, "max_test_samples", f"must be >= 0, got {e.max_test_samples}")
    need(e.num_cpus >= 0 and e.num_gpus >= 0, "num_cpus", "eval.num_cpus and eval.num_gpus must be >= 0")
    need(
        bool(e.probe_weight_decays) and all(w >= 0 for w in e.probe_weight_decays),
        "probe_weight_decays",
        f"need one or more values >= 0, got {list(e.probe_weight_decays)}",
    )
    valid = metric_names([p for p in e.protocols if p in EVAL_PROTOCOLS])
    need(
        not valid or e.select_metric in valid,
        "select_metric",
        f"{e.select_metric!r} is not measured by eval.protocols; valid choices: {', '.join(valid)}",
    )
    for key in ("fit_urls", "test_urls"):
        url = getattr(e, key)
        bad = unsupported_scheme(url, DATA_SCHEMES) if url else None
        need(bad is None, key, bad or "")
    return found


@dataclass
class EvaluateConfig:
    """The tree composed by `python -m pretrain.evaluate`."""

    # The encoder: models:/<name>@<alias> | models:/<name>/<version|latest> | runs:/<run_id>/encoder
    # | a directory written by an export (an encoder artifact: model.safetensors + pretrain.json).
    model_uri: str = ""
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Storage options, the embedded default's location and sizes (the shards come from eval.*).
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="evaluate"))
    # Results as JSON ("" = ./runs/eval/<model>-<time>.json).
    output: str = ""
    # "" = cuda when available, else cpu.
    device: str = ""


def evaluate_problems(cfg: Any) -> list[tuple[str, str]]:
    """Mistakes in a `pretrain.evaluate` config."""
    found: list[tuple[str, str]] = []
    uri = cfg.model_uri
    if not uri:
        found.append(
            (
                "model_uri",
                "required: models:/<name>@<alias>, models:/<name>/latest, runs:/<run_id>/encoder or a directory",
            )
        )
    elif not uri.startswith(("models:/", "runs:/")) and unsupported_scheme(uri, STORAGE_SCHEMES):
        found.append(
            (
                "model_uri",
                f"{unsupported_scheme(uri, STORAGE_SCHEMES)}; or use models:/<name>@<alias>, runs:/<run_id>/<path>",
            )
        )
    found.extend(eval_problems(cfg.eval))
    if cfg.device and cfg.device.split(":")[0] not in ("cpu", "cuda", "xpu", "mps"):
        found.append(("device", f"unknown device {cfg.device!r}; use cpu, cuda, cuda:N or leave empty"))
    return found
