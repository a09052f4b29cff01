"""`python -m pretrain.evaluate model_uri=<uri> [eval=knn|linear_probe] [key=value ...]`: frozen-feature evaluation.

    python -m pretrain.evaluate model_uri='models:/mae-vit_nano@best'
    python -m pretrain.evaluate model_uri=runs:/<run_id>/encoder eval=knn
    python -m pretrain.evaluate model_uri=runs/<run>/export/encoder \\
        eval.fit_urls=s3://b/in1k/train.manifest.json eval.test_urls=s3://b/in1k/val.manifest.json

Extracts frozen features of the encoder (and of a randomly initialised encoder of the
same architecture, the baseline) on labelled shards, and reports weighted-kNN and
linear-probe top-1 accuracy on the held-out set: a table on stdout, a JSON file, and
an MLflow run (experiment `evaluate`). The same `evaluate_encoder` runs at the end
of every `pretrain.run` (pretrain/publish.py).

Config mistakes exit with code 2 and one line, before torch is imported.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.features import Encoder, extract, load_encoder, pick_device, random_init_like

if TYPE_CHECKING:
    import torch

    from data.config import DataConfig
    from data.labelled import LabelledSource
    from pretrain.config import EvalConfig, EvaluateConfig

USAGE = __doc__ or ""
log = logging.getLogger("pretrain.evaluate")


@dataclass
class EvalResult:
    """Accuracies (fractions) of the encoder and of the random-init baseline, and what they were measured on."""

    model_uri: str
    arch: str
    features: str
    fit_samples: int
    test_samples: int
    num_classes: int
    skipped: int
    encoder: dict[str, float] = field(default_factory=dict)  # {"knn_top1": ..., "linear_top1": ...}
    baseline: dict[str, float] = field(default_factory=dict)
    linear_weight_decay: float | None = None
    confusion: list[list[int]] = field(default_factory=list)  # kNN (else linear) of the encoder, rows = truth
    seconds: float = 0.0
    step: int | None = None

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: eval/<metric>, eval/baseline_<metric>."""
        out = {f"eval/{k}": v for k, v in self.encoder.items()}
        out.update({f"eval/baseline_{k}": v for k, v in self.baseline.items()})
        return out


# --- data ------------------------------------------------------------------------


def eval_sources(e: EvalConfig, data: DataConfig) -> tuple[LabelledSource, LabelledSource]:
    """Fit and test sets of `e`: explicit URLs, a key-hash split of the test URLs, or the embedded default."""
    from data.default import ensure_default_dataset
    from data.labelled import LabelledSource
    from data.stream import resolve_urls

    def urls(pattern: str) -> list[str]:
        return resolve_urls(pattern, data.storage_options, retries=data.io_retries, retry_wait_s=data.io_retry_wait_s)

    common = {"storage_options": data.storage_options, "io_retries": data.io_retries}
    test_urls = e.test_urls or data.eval_urls
    if e.fit_urls:
        fit = LabelledSource(urls(e.fit_urls), max_samples=e.max_fit_samples, **common)
        test_pattern = test_urls or e.fit_urls
        holdout = None if test_urls else (e.holdout_fraction, True, e.seed)
        if holdout is not None:  # one labelled set: split it
            fit.holdout = (e.holdout_fraction, False, e.seed)
        test = LabelledSource(urls(test_pattern), holdout=holdout, max_samples=e.max_test_samples, **common)
    elif test_urls:
        shards = urls(test_urls)
        fit = LabelledSource(
            shards, holdout=(e.holdout_fraction, False, e.seed), max_samples=e.max_fit_samples, **common
        )
        test = LabelledSource(
            shards, holdout=(e.holdout_fraction, True, e.seed), max_samples=e.max_test_samples, **common
        )
    else:  # embedded default: fit on the (labelled) train split, test on the held-out eval split
        default = ensure_default_dataset(data)
        fit = LabelledSource(urls(default.train_url), max_samples=e.max_fit_samples, **common)
        test = LabelledSource(urls(default.eval_url), max_samples=e.max_test_samples, **common)
    return fit, test


def evaluate_encoder(
    encoder: Encoder,
    e: EvalConfig,
    fit: LabelledSource,
    test: LabelledSource,
    *,
    device: torch.device,
) -> EvalResult:
    """kNN and/or linear-probe accuracy of `encoder` (and the random-init baseline) on `test`, fitted on `fit`."""
    return _evaluate(encoder, e, fit, test, device=device)


def _evaluate(
    encoder: Encoder, e: EvalConfig, fit: LabelledSource, test: LabelledSource, *, device: torch.device
) -> EvalResult:

    from data.labelled import empty_message, labelled_batches
    from pretrain.probe import accuracy, confusion_matrix, knn_predict, linear_probe_predict

    tic = time.perf_counter()
    models = {"encoder": encoder.vit.to(device).eval()}
    if e.baseline:
        models["baseline"] = random_init_like(encoder, e.seed).to(device)
    read = {
        "img_size": encoder.img_size,
        "crop_pct": e.crop_pct,
        "mean": encoder.mean,
        "std": encoder.std,
        "batch_size": e.batch_size,
        "num_workers": e.num_workers,
    }
    what = f"eval features, %s set ({' + '.join(models)})"
    features = encoder.features_for(e.features)
    fit_feats, fit_labels, fit_bad = extract(
        models, labelled_batches(fit, **read), device=device, features=features, what=what % "fit"
    )
    test_feats, test_labels, test_bad = extract(
        models, labelled_batches(test, **read), device=device, features=features, what=what % "test"
    )
    for source, labels, bad in ((fit, fit_labels, fit_bad), (test, test_labels, test_bad)):
        if not labels.numel():
            raise ValueError(empty_message(source, bad))
    num_classes = int(max(fit_labels.max(), test_labels.max())) + 1
    result = EvalResult(
        model_uri=encoder.source,
        arch=encoder.arch,
        features=features,
        fit_samples=int(fit_labels.numel()),
        test_samples=int(test_labels.numel()),
        num_classes=num_classes,
        skipped=fit_bad + test_bad,
    )
    for name in models:
        scores = result.encoder if name == "encoder" else result.baseline
        fit_x, test_x = fit_feats[name].to(device), test_feats[name].to(device)
        fit_y = fit_labels.to(device)
        predictions: dict[str, torch.Tensor] = {}
        if "knn" in e.protocols:
            predictions["knn"] = knn_predict(fit_x, fit_y, test_x, num_classes, k=e.k, temperature=e.temperature)
        if "linear" in e.protocols:
            probe = linear_probe_predict(
                fit_x, fit_y, test_x, num_classes, weight_decays=list(e.probe_weight_decays), seed=e.seed
            )
            predictions["linear"] = probe.predictions
            if name == "encoder":
                result.linear_weight_decay = probe.weight_decay
        for protocol, pred in predictions.items():
            scores[f"{protocol}_top1"] = accuracy(pred.cpu(), test_labels)
        if name == "encoder":
            first = next(iter(predictions.values()))
            result.confusion = confusion_matrix(test_labels, first.cpu(), num_classes).tolist()
    result.seconds = time.perf_counter() - tic
    return result


# --- reporting ---------------------------------------------------------------------


def result_table(result: EvalResult) -> list[str]:
    """Lines of the stdout table: protocol | encoder | random init | gain (points)."""
    names = {"knn_top1": "kNN top-1", "linear_top1": "linear probe top-1"}
    lines = [
        f"model     {result.model_uri} ({result.arch}, {result.features} features)",
        f"data      fit {result.fit_samples}, test {result.test_samples} held out, "
        f"{result.num_classes} classes, {result.skipped} bad samples skipped",
        f"{'protocol':<20}{'encoder':>10}{'random init':>14}{'gain':>10}",
    ]
    for key, value in result.encoder.items():
        base = result.baseline.get(key)
        base_text = f"{100 * base:.1f}%" if base is not None else "-"
        gain = f"{100 * (value - base):+.1f}" if base is not None else "-"
        lines.append(f"{names.get(key, key):<20}{100 * value:>9.1f}%{base_text:>14}{gain:>10}")
    return lines


def log_result(result: EvalResult, *, tracking_uri: str, run_id: str, step: int | None = None) -> None:
    """Metrics, the JSON and the confusion-matrix picture into MLflow run `run_id`."""
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step or 0) for k, v in result.metrics().items()]
    client.log_batch(run_id, metrics=metrics)
    suffix = f"-step{step:08d}" if step is not None else ""
    client.log_text(run_id, json.dumps(asdict(result), indent=2), f"eval/results{suffix}.json")
    if result.confusion:
        from objectives.components.pictures import confusion_image

        client.log_image(run_id, confusion_image(np.array(result.confusion)), f"eval/confusion{suffix}.png")


# --- CLI -----------------------------------------------------------------------------


def _default_output(uri: str) -> Path:
    from objectives.artifacts import registry_name

    stem = registry_name(uri.removeprefix("models:/").removeprefix("runs:/"))
    return Path("runs") / "eval" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def run_evaluation(cfg: EvaluateConfig) -> EvalResult:
    """Load, evaluate, print, write JSON and log to MLflow (the CLI's body)."""
    from pretrain.tracking import default_tracking_uri, run_url

    tracking_uri = cfg.tracking.uri or default_tracking_uri(Path("runs").resolve())
    encoder = load_encoder(cfg.model_uri, tracking_uri=tracking_uri, storage_options=cfg.data.storage_options)
    fit, test = eval_sources(cfg.eval, cfg.data)
    result = evaluate_encoder(encoder, cfg.eval, fit, test, device=pick_device(cfg.device))
    print("\n== pretrain evaluate ==")
    for line in result_table(result):
        print(line)
    output = Path(cfg.output) if cfg.output else _default_output(cfg.model_uri)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(f"json      {output}")
    if cfg.tracking.enabled:
        from pretrain.tracking import _client

        client = _client(tracking_uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
        run = client.create_run(exp_id, run_name=f"eval {cfg.model_uri}", tags={"pretrain.model_uri": cfg.model_uri})
        from mlflow.entities import Param

        params = {
            "model_uri": cfg.model_uri,
            "arch": encoder.arch,
            **{f"eval.{k}": v for k, v in asdict(cfg.eval).items()},
        }
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        log_result(result, tracking_uri=tracking_uri, run_id=run.info.run_id)
        client.set_terminated(run.info.run_id)
        print(f"mlflow    {run_url(tracking_uri, run.info.run_id)}")
    print(f"time      {result.seconds:.1f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from pretrain.compose import EVALUATE_GROUPS, ConfigError, group_options, load_config

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        for group in EVALUATE_GROUPS:
            print(f"  {group:<10} {', '.join(group_options(group))}")
        return 0
    show = "--cfg" in argv or any(a.startswith("--cfg=") for a in argv)
    overrides = [a for a in argv if not a.startswith("--cfg") and a != "job"]
    try:
        for item in overrides:
            if item.startswith("-"):
                raise ConfigError(item, "unknown option; options: --cfg job, --help (everything else is key=value)")
            if "=" not in item:
                raise ConfigError(item, "expected key=value (e.g. model_uri=models:/mae-vit_nano@best)")
        cfg = load_config(overrides, "evaluate")
    except ConfigError as exc:
        print(exc.lines(), file=sys.stderr)
        return 2
    if show:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0
    from pretrain.trainer.worker import configure_logging

    configure_logging()
    from mlflow.exceptions import MlflowException

    try:
        run_evaluation(OmegaConf.to_object(cfg))
    except (FileNotFoundError, ValueError, MlflowException) as exc:  # a wrong URI or unusable data: one line
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
