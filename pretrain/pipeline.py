"""Multi-stage recipes: `python -m pretrain.run objective=beitv2` runs the chain of stages it needs.

An objective declares what it consumes from earlier stages (`ObjectiveConfig.inputs()`:
a teacher, a tokenizer, centroids). An input given as a URI or path is used as given. An
input left to `stage:<objective>` is resolved before anything starts: the registry's
version built by that stage with the same settings (reused), else its `best` or newest
compatible version, else the stage is trained first, as a run of its own nested under one
parent MLflow run, and the next stage continues on what it registered. The plan is printed
first (`pipeline.dry_run=true` prints only the plan). Per-stage settings:
`stages.<objective>.<key>=<value>`; the rest of the command line applies to every stage
except the keys in `LOCAL_KEYS`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf

from objectives.configs import stage_of
from pretrain.compose import CONF_MODULE, GROUPS, ConfigError, load_config
from pretrain.resolve import (
    RUN_DIR_TAG,
    Found,
    Want,
    data_key,
    find_version,
    registry_client,
    stage_key,
    unfinished_run,
)

log = logging.getLogger("pretrain.pipeline")

# Keys of the command line that belong to the requested stage only.
LOCAL_KEYS = ("objective", "optim", "preset", "name", "resume", "tracking.registered_model", "pipeline", "stages")
PAPER_PRESET = "none"


@dataclass
class Input:
    """Where one input of a stage comes from."""

    role: str
    key: str
    kind: str
    value: str  # as configured: a URI, a path or stage:<objective>
    how: str  # given | reused | registry | train
    why: str
    uri: str = ""  # what the stage gets ("" until the producing stage ran)
    producer: Stage | None = None


@dataclass
class Stage:
    """One run of the pipeline: an objective, its composed config and its inputs."""

    objective: str
    cfg: DictConfig
    settings: list[str]  # overrides given for this stage (the command line, or stages.<objective>.*)
    preset: str
    final: bool = False
    inputs: list[Input] = field(default_factory=list)
    reused: Found | None = None  # its output taken from the registry: not trained
    outputs: dict[str, str] = field(default_factory=dict)  # kind -> URI, once known
    run_name: str = ""

    @property
    def trains(self) -> bool:
        return self.reused is None

    def resolved_cfg(self) -> Any:
        """The PretrainConfig with every input replaced by what it resolved to."""
        cfg = self.cfg.copy()
        for item in self.inputs:
            uri = item.uri or (item.producer.outputs.get(item.kind, "") if item.producer else "")
            if not uri:
                raise RuntimeError(f"stage {self.objective}: input {item.role} is not resolved yet")
            OmegaConf.update(cfg, item.key, uri)
        return OmegaConf.to_object(cfg)

    def registers(self) -> dict[str, str]:
        """{kind: registered model name} of what a run of this stage registers."""
        from pretrain.publish import registered_name

        cfg = self.cfg
        if not (cfg.tracking.enabled and cfg.tracking.register):
            return {}
        names = {"encoder": registered_name(OmegaConf.to_object(cfg))}
        kinds = OmegaConf.to_object(cfg.objective).outputs()
        if "tokenizer" in kinds:
            names["tokenizer"] = self._tokenizer_name()
        if "centroids" in kinds:
            names["centroids"] = cfg.objective.registered_name or (
                f"ccvit-centroids-{cfg.objective.num_centroids}x{cfg.model.patch_size}"
            )
        return names

    def _tokenizer_name(self) -> str:
        """vqkd-<teacher name>, as objectives/vqkd.py registers it."""
        from objectives.artifacts import registry_name, source_name

        if self.cfg.objective.registered_name:
            return self.cfg.objective.registered_name
        teacher = next(i for i in self.inputs if i.role == "teacher")
        source = teacher.uri
        if not source and teacher.producer is not None:
            source = f"models:/{teacher.producer.registers().get('encoder', teacher.producer.objective)}"
        return registry_name(f"vqkd-{source_name(source or teacher.value)}")


@dataclass
class Plan:
    """The stages in the order they run (upstream first); the last is the one asked for."""

    stages: list[Stage]
    tracking_uri: str
    storage: str

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def is_local(override: str) -> bool:
    """Whether an override belongs to the requested stage only (`preset=none` is shared)."""
    key = _key(override)
    if key == "preset":
        return override.split("=", 1)[1] != PAPER_PRESET
    return any(key == k or key.startswith(f"{k}.") for k in LOCAL_KEYS)


def stage_settings(stages: dict[str, Any], objective: str) -> list[str]:
    """`stages.<objective>` as overrides: group choices (`model: vit_tiny`) and dotted values."""
    from pretrain.compose import override_value

    def walk(tree: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for k, v in tree.items():
            if isinstance(v, dict) and v:
                out += walk(v, f"{prefix}{k}.")
            elif not prefix and k in GROUPS and isinstance(v, str):
                out.append(f"{k}={v}")
            else:
                out.append(f"{prefix}{k}={override_value(v)}")
        return out

    return walk(stages.get(objective) or {}, "")


def compose_stage(objective: str, overrides: list[str], stages: dict[str, Any]) -> Stage:
    """The config of an upstream stage: the shared command line, then stages.<objective>.*."""
    shared = [o for o in overrides if not is_local(o)]
    own = stage_settings(stages, objective)
    try:
        cfg = load_config([f"objective={objective}", *shared, *own])
    except ConfigError as err:
        own_key = any(_key(o) == err.key or _key(o).startswith(f"{err.key}.") for o in own)
        key = f"stages.{objective}.{err.key}" if own_key else f"{err.key} (stage {objective})"
        raise ConfigError(key, str(err).split(": ", 1)[1]) from None
    return Stage(objective, cfg, own, str(cfg.preset_name))


def provenance(stage: Stage, key: str) -> str:
    """Why a stage's input has its value: given, the CPU preset, or the paper recipe."""
    if any(_key(o) == key for o in stage.settings):
        return "given on the command line" if stage.final else f"given as stages.{stage.objective}.{key}"
    name = stage.objective
    if stage.preset != PAPER_PRESET and _yaml_value("preset", stage.preset, key) is not None:
        paper = _yaml_value("objective", name, key.removeprefix("objective."))
        tail = f"; preset=none uses the paper's {paper}" if paper and paper != OmegaConf.select(stage.cfg, key) else ""
        return f"the CPU preset (pretrain/conf/preset/{stage.preset}.yaml){tail}"
    return f"the paper recipe (pretrain/conf/objective/{name}.yaml)"


def _yaml_value(group: str, option: str, key: str) -> Any:
    """The value a group's YAML file sets for `key` (dotted), or None."""
    path = resources.files(CONF_MODULE).joinpath(group, f"{option}.yaml")
    if not path.is_file():
        return None
    return OmegaConf.select(OmegaConf.create(path.read_text()), key, default=None)


def check_grid(producer: Stage, consumer: Stage, role: str) -> None:
    """A stage trained for a consumer must see images as it does: same image size and patch size."""
    have = (producer.cfg.model.img_size, producer.cfg.model.patch_size)
    need = (consumer.cfg.model.img_size, consumer.cfg.model.patch_size)
    if have != need:

        def sized(stage: Stage) -> bool:  # the user set this stage's model with stages.<objective>.model*
            return not stage.final and any(_key(o) == "model" or _key(o).startswith("model.") for o in stage.settings)

        blamed = producer if sized(producer) else consumer if sized(consumer) else None
        key = f"stages.{blamed.objective}.model" if blamed else "model"
        raise ConfigError(
            key,
            f"the {producer.objective} stage would train at {have[0]} px with {have[1]} px patches, but the "
            f"{consumer.objective} stage needs its {role} at {need[0]} px with {need[1]} px patches",
        )


class Planner:
    """Builds the plan: composes each stage, resolves its inputs against the registry, recursively."""

    def __init__(self, root: DictConfig, overrides: list[str], tracking_uri: str) -> None:
        self.root = root
        self.overrides = overrides
        self.tracking_uri = tracking_uri
        self.stages_node: dict[str, Any] = OmegaConf.to_container(root.stages) or {}
        self.order: list[Stage] = []
        self.by_name: dict[str, Stage] = {}
        self.resolve = root.pipeline.resolve != "never" and root.tracking.enabled

    def plan(self) -> list[Stage]:
        name = self.root.objective.name
        own = stage_settings(self.stages_node, name)
        cfg = self.root
        if own:  # stages.<this objective>.* apply to this stage too, after the command line
            try:
                cfg = load_config([*self.overrides, *own])
            except ConfigError as err:
                raise ConfigError(f"stages.{name}.{err.key}", str(err).split(": ", 1)[1]) from None
        settings = [*self.overrides, *own]
        final = Stage(name, cfg, settings, str(cfg.preset_name), final=True)
        self._resolve_inputs(final, visiting=(final.objective,))
        self.order.append(final)
        from pretrain.config import objective_outputs

        known = ", ".join(self.by_name) or "none"
        for extra in sorted(set(self.stages_node) - set(self.by_name) - {name}):
            if extra not in objective_outputs():
                raise ConfigError(f"stages.{extra}", f"unknown objective; this run's earlier stages: {known}")
            # A recipe may size stages a given input makes unnecessary.
            log.warning("stages.%s: not a stage of this run (earlier stages: %s); ignored", extra, known)
        return self.order

    def _resolve_inputs(self, stage: Stage, visiting: tuple[str, ...]) -> None:
        for spec in OmegaConf.to_object(stage.cfg.objective).inputs():
            producer_name = stage_of(spec.value)
            why = provenance(stage, spec.key)
            if not producer_name:
                stage.inputs.append(Input(spec.role, spec.key, spec.kind, spec.value, "given", why, uri=spec.value))
                continue
            if producer_name in visiting:
                chain = " -> ".join([*visiting, producer_name])
                raise ConfigError(spec.key, f"stage:{producer_name} makes a cycle ({chain})")
            producer = self._stage(producer_name, visiting)
            item = Input(spec.role, spec.key, spec.kind, spec.value, "train", why, producer=producer)
            found = self._lookup(producer, spec.kind, stage)
            if found is not None:
                producer.reused = producer.reused or found
                producer.outputs[spec.kind] = found.uri
                item.how, item.uri = found.how, found.uri
            else:
                check_grid(producer, stage, spec.role)
            stage.inputs.append(item)

    def _stage(self, name: str, visiting: tuple[str, ...]) -> Stage:
        if name not in self.by_name:
            stage = compose_stage(name, self.overrides, self.stages_node)
            self._resolve_inputs(stage, (*visiting, name))
            self.by_name[name] = stage
            self.order.append(stage)
        return self.by_name[name]

    def _lookup(self, producer: Stage, kind: str, consumer: Stage) -> Found | None:
        """The registry version of the producer's `kind` the consumer may use, or None (train it)."""
        if not self.resolve or any(i.how == "train" for i in producer.inputs):
            return None  # nothing registered can have been built on an upstream still to train
        teacher = next((i.uri for i in producer.inputs if i.role == "teacher"), "") if kind == "tokenizer" else ""
        want = Want(
            kind=kind,
            img_size=consumer.cfg.model.img_size,
            patch_size=consumer.cfg.model.patch_size,
            teacher=teacher,
            key=stage_key(producer.resolved_cfg()),
            data=data_key(OmegaConf.to_object(producer.cfg.data)),
            exact=bool(self.stages_node.get(producer.objective)),
        )
        name = producer.registers().get(kind)
        return find_version(self.tracking_uri, name, want) if name else None


def is_pipeline(cfg: DictConfig) -> bool:
    """Whether the run consumes earlier stages' outputs (its plan is printed first)."""
    return bool(OmegaConf.to_object(cfg.objective).inputs()) or bool(cfg.stages)


def plan_tracking_uri(cfg: DictConfig) -> tuple[str, str]:
    """(tracking URI, storage path) the stages will use: tracking.uri, else the sqlite store beside the runs."""
    from pathlib import Path

    from pretrain.launch import place_for

    place = place_for(OmegaConf.to_object(cfg))
    if not cfg.tracking.enabled:
        return "", place.storage_path
    uri = cfg.tracking.uri or f"sqlite:///{(Path(place.local_root) / 'mlflow.db').resolve()}"
    return uri, place.storage_path


def build_plan(root: DictConfig, overrides: list[str]) -> Plan:
    """Compose every stage and resolve its inputs; raises ConfigError for a bad stage setting."""
    uri, storage = plan_tracking_uri(root)
    return Plan(Planner(root, overrides, uri).plan(), uri, storage)


def plan_lines(plan: Plan) -> list[str]:
    """The plan as printed: one block per stage, its inputs and what it registers."""
    number = {id(s): n for n, s in enumerate(plan.stages, 1)}
    lines = [f"== pretrain plan: {plan.final.objective}, {len(plan.stages)} stage(s) =="]
    for stage in plan.stages:
        head = f"{number[id(stage)]}. {stage.objective:<12}"
        if stage.trains:
            model = stage.cfg.model.name or stage.cfg.model.arch
            lines.append(f"{head} train  {stage.cfg.trainer.max_steps} steps, model {model}, preset {stage.preset}")
        else:
            lines.append(f"{head} reuse  {stage.reused.uri} ({stage.reused.why})")
        for item in stage.inputs:
            if item.producer is None:
                source = item.uri
            elif item.how == "train":
                source = f"stage {number[id(item.producer)]} ({item.producer.objective}, trained here)"
            else:
                source = f"{item.uri} ({item.producer.objective}: {'reused' if item.how == 'reused' else 'registry'})"
            lines.append(f"   {item.role} <- {source}")
            lines.append(f"      {item.value}: {item.why}")
        if stage.trains:
            registers = ", ".join(f"{name} ({kind})" for kind, name in stage.registers().items())
            lines.append(f"   registers {registers or 'nothing (tracking.register=false)'}")
    if plan.tracking_uri:
        lines.append(f"registry: {plan.tracking_uri}")
    return lines


def print_plan(plan: Plan) -> str:
    text = "\n".join(plan_lines(plan))
    print(text, flush=True)
    return text


def run_pipeline(plan: Plan, plan_text: str) -> int:
    """Run the stages that train, upstream first, each as a run nested under one parent run; exit code."""
    from pretrain import tracking
    from pretrain.launch import artifact_root, place_for

    parent = ""
    final = OmegaConf.to_object(plan.final.cfg)
    if plan.tracking_uri and len(plan.stages) > 1:
        name = f"pipeline-{plan.final.objective}-{time.strftime('%Y%m%d-%H%M%S')}"
        root = artifact_root(final, place_for(final))
        parent = tracking.open_run(plan.tracking_uri, final.tracking.experiment, name, artifact_root=root)
        client = registry_client(plan.tracking_uri)
        client.set_tag(parent, "pretrain.pipeline", plan.final.objective)
        client.log_text(parent, plan_text + "\n", "pipeline/plan.txt")
    started = time.perf_counter()
    total = len(plan.stages)
    for n, stage in enumerate(plan.stages, 1):
        if stage.trains:
            log.info("stage %d/%d %s: training", n, total, stage.objective)
            rc = run_stage(stage, plan, parent)
            if rc != 0:
                print(
                    f"error: stage {n}/{total} {stage.objective} failed (run {stage.run_name}); run the same "
                    "command again to continue it from its last checkpoint",
                    flush=True,
                )
                if parent:
                    tracking.close_run(plan.tracking_uri, parent, failed=True)
                return rc
            done = f"trained {', '.join(f'{k} {v}' for k, v in stage.outputs.items())}"
        else:
            log.info("stage %d/%d %s: reused %s", n, total, stage.objective, stage.reused.uri)
            done = f"reused {stage.reused.uri}"
        if parent:
            registry_client(plan.tracking_uri).set_tag(parent, f"pretrain.stage.{n}", f"{stage.objective} {done}")
    lines = chain_lines(plan, parent, time.perf_counter() - started)
    print("\n".join(lines), flush=True)
    if parent:
        registry_client(plan.tracking_uri).log_text(parent, "\n".join(lines) + "\n", "pipeline/summary.txt")
        tracking.close_run(plan.tracking_uri, parent, failed=False)
    return 0


def run_stage(stage: Stage, plan: Plan, parent: str) -> int:
    """Train one stage (resuming its failed run with the same settings); fills stage.outputs."""
    from pretrain.launch import launch, place_for, read_run_record

    cfg = stage.resolved_cfg()
    place, record = place_for(cfg), None
    previous = unfinished_run(plan.tracking_uri, cfg.tracking.experiment, stage_key(cfg)) if plan.tracking_uri else None
    if previous is not None:
        run_dir = previous.data.tags.get(RUN_DIR_TAG, "")
        if previous.info.status == "RUNNING":
            log.warning(
                "stage %s: run %s with the same settings is marked RUNNING: another pipeline trains the same "
                "stage now, or one was killed. Training a separate run; if that one was killed, continue it "
                "with `python -m pretrain.run resume=%s`",
                stage.objective,
                previous.info.run_name,
                run_dir,
            )
        elif cfg.pipeline.resume_failed and run_dir:
            cfg.resume = run_dir
            place = place_for(cfg)
            record = read_run_record(place, cfg.data.storage_options)
            if record is None:
                cfg.resume, place = "", place_for(cfg)
            else:
                log.info(
                    "stage %s: resuming %s run %s from its last checkpoint",
                    stage.objective,
                    previous.info.status,
                    place.name,
                )
                cfg.name = place.name
    stage.run_name = place.name
    rc = launch(cfg, place, record, parent_run_id=parent)
    if rc == 0:
        stage.outputs.update(stage_outputs(cfg, place, plan.tracking_uri))
    return rc


def stage_outputs(cfg: Any, place: Any, tracking_uri: str) -> dict[str, str]:
    """{kind: URI} a finished stage handed on: its registered versions, or its export folders without tracking."""
    from pretrain.export import exports_in_dir, exports_of_run
    from pretrain.launch import read_run_record

    if tracking_uri:
        record = read_run_record(place, cfg.data.storage_options) or {}
        exports = exports_of_run(tracking_uri, record.get("mlflow_run_id", ""))
    else:
        exports = exports_in_dir(place.run_dir, cfg.data.storage_options)
    return {kind: exports[kind] for kind in cfg.objective.outputs() if kind in exports}


def version_summary(uri: str, tracking_uri: str, metric: str) -> str:
    """`knn_top1 41.2% (random init 30.1%)` from a registered version's eval tags, or ""."""
    if not tracking_uri or not uri.startswith("models:/"):
        return ""
    from mlflow.exceptions import MlflowException

    name, _, version = uri.removeprefix("models:/").partition("/")
    try:
        tags = registry_client(tracking_uri).get_model_version(name, version).tags
    except MlflowException:
        return ""
    value, base = tags.get(f"eval.{metric}"), tags.get(f"eval.baseline_{metric}")
    if value is None:
        return ""
    versus = f" (random init {100 * float(base):.1f}%)" if base is not None else ""
    return f"{metric} {100 * float(value):.1f}%{versus}"


def chain_lines(plan: Plan, parent: str, seconds: float) -> list[str]:
    """The pipeline summary: each stage, trained or reused, what it handed on and how it evaluates."""
    metric = plan.final.cfg.eval.select_metric
    lines = [f"\n== pipeline summary: {plan.final.objective} =="]
    for n, stage in enumerate(plan.stages, 1):
        outputs = stage.outputs if stage.trains else {k: v for k, v in stage.outputs.items()}
        shown = ", ".join(f"{kind} {uri}" for kind, uri in outputs.items()) or "-"
        score = version_summary(outputs.get("encoder", ""), plan.tracking_uri, metric)
        state = "trained" if stage.trains else "reused "
        lines.append(f"{n}. {stage.objective:<12} {state}  {shown}{f'  [{score}]' if score else ''}")
    reused = [s.objective for s in plan.stages if not s.trains]
    lines.append(f"reused stages: {', '.join(reused) if reused else 'none'}; wall time {seconds:.0f} s")
    if parent:
        from pretrain.tracking import run_url

        lines.append(f"pipeline run: {run_url(plan.tracking_uri, parent)}")
    return lines
