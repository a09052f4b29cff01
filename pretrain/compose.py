"""Compose the Hydra config from `pretrain/conf/` and turn every mistake into one line.

Uses Hydra's compose API (not `@hydra.main`) so that the entry point controls exit
codes and messages, and no output directory or logging set-up is forced on runs.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from objectives import configs as objective_configs
from pretrain.config import EvaluateConfig, PretrainConfig, evaluate_problems, find_problems

CONF_MODULE = "pretrain.conf"
# Groups whose options are YAML files in pretrain/conf/<group>/.
GROUPS = ("objective", "model", "data", "trainer", "tracking", "eval", "optim", "preset")
# Groups of `python -m pretrain.evaluate` (pretrain/conf/evaluate.yaml).
EVALUATE_GROUPS = ("eval", "data", "tracking")


class ConfigError(ValueError):
    """A config mistake, reported to the user as one line: `key: message` (str() is the first).

    `more`: further problems found in the same check, each printed on its own line.
    """

    def __init__(self, key: str, message: str, more: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.problems = [(key, message), *more]

    def lines(self) -> str:
        """Every problem as `error: key: message`, one per line."""
        return "\n".join(f"error: {key}: {message}" for key, message in self.problems)


@functools.cache
def _register_schemas() -> None:
    """The dataclass schemas in Hydra's ConfigStore, once per process: it outlives GlobalHydra's
    clear(), and storing them again cost 0.16 s of every load_config (40%; docs/benchmarks.md)."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    for cls in objective_configs.objective_config_classes():
        cs.store(group="schema/objective", name=cls().name, node=cls)


def group_options(group: str) -> list[str]:
    """Options of a config group: the YAML files in pretrain/conf/<group>/."""
    folder = resources.files(CONF_MODULE).joinpath(group)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _group_of_missing(message: str) -> tuple[str, str] | None:
    # Hydra: "In 'config': Could not find 'objective/nope'" / "Could not load 'objective/nope'"
    match = re.search(r"Could not (?:find|load) '([\w/]+)/([^'/]+)'", message)
    if match and match.group(1) in GROUPS:
        return match.group(1), match.group(2)
    return None


def _explain(exc: Exception, overrides: list[str], config_name: str = "config") -> ConfigError:
    """Turn Hydra/OmegaConf's exception into a one-line ConfigError."""
    if exc.__cause__ is not None and "Error merging override" in str(exc):
        exc = exc.__cause__  # the OmegaConf error names the key and the type
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if type(exc).__name__ == "OverrideParseException":
        bad = next((o for o in overrides if o.split("=", 1)[0] in str(exc)), overrides[-1] if overrides else "")
        return ConfigError(
            _override_key(bad) or "override",
            f"cannot parse {bad!r} ({message}); quote values with special characters: key='value'",
        )
    missing = _group_of_missing(str(exc))
    if missing:
        group, option = missing
        if group == "preset" and option.endswith("_cpu"):
            return ConfigError(
                "preset",
                f"no CPU preset {option!r} for this objective; valid choices: {', '.join(group_options('preset'))}",
            )
        return ConfigError(group, f"unknown {group} {option!r}; valid choices: {', '.join(group_options(group))}")
    key_match = re.search(r"Key '([^']+)' not in '(\w+)'", str(exc))
    if key_match is None:
        key_match = re.search(r"Could not override '([^']+)'", str(exc))
    full_key = re.search(r"full_key: ([\w.\[\]]+)", str(exc))
    key = full_key.group(1) if full_key else (key_match.group(1) if key_match else "config")
    if "not in" in str(exc) or "Could not override" in str(exc) or "Key '" in str(exc):
        parent, _, leaf = key.rpartition(".")
        valid = _valid_keys(parent, overrides, config_name)
        if valid:
            hint = f"; valid keys under {parent or 'the root'}: {', '.join(valid)}"
            return ConfigError(key, f"unknown key {leaf!r}{hint}")
    value_error = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", str(exc))
    if value_error:
        return ConfigError(key, f"{value_error.group(1)!r} is not a valid {value_error.group(2)}")
    return ConfigError(key, message)


def _valid_keys(parent: str, overrides: list[str], config_name: str = "config") -> list[str]:
    """Keys of the node `parent` in the config composed without the bad override."""
    try:
        kept = [o for o in overrides if "=" in o and not _override_key(o).startswith(parent + ".")]
        base = _compose(kept, config_name)
    except Exception:  # noqa: BLE001 - only used to improve a message; the caller reports the original
        base = _compose([], config_name)
    node = OmegaConf.select(base, parent) if parent else base
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def quote_urls(override: str) -> str:
    """Quote URL values for Hydra's override grammar.

    `data.urls=s3://b/train-{000000..000099}.tar` (the shell already removed the
    user's quotes) would otherwise be parsed as a dict by Hydra.
    """
    key, sep, value = override.partition("=")
    if not sep or not value or value[0] in "'\"" or not ("://" in value or re.search(r"\{[^}]*\.\.[^}]*\}", value)):
        return override
    return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def stage_override(override: str) -> str:
    """`stages.<objective>.<key>=v` adds a key to the open `stages` node: Hydra's `++` form."""
    return f"++{override}" if override.startswith("stages.") else override


def override_value(value: Any) -> str:
    """A YAML value as Hydra override text: numbers, booleans and null as is, strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def recipe_overrides(source: str) -> list[str]:
    """The overrides of a recipe: pretrain/conf/recipes/<source>.yaml, or a YAML file at the path `source`.

    A recipe is a YAML mapping of what the command line would say (`objective: beitv2`,
    `trainer: {max_steps: 60}`, `stages: {mae: {trainer: {max_steps: 40}}}`).
    """
    packaged = resources.files(CONF_MODULE).joinpath("recipes", f"{source}.yaml")
    if packaged.is_file():
        text = packaged.read_text()
    else:
        from pathlib import Path

        path = Path(source).expanduser()
        if not path.is_file():
            shipped = ", ".join(
                sorted(
                    p.name[:-5]
                    for p in resources.files(CONF_MODULE).joinpath("recipes").iterdir()
                    if p.name.endswith(".yaml")
                )
            )
            raise ConfigError("recipe", f"no recipe {source!r}: not a file, nor one of {shipped}")
        text = path.read_text()
    try:
        tree = OmegaConf.to_container(OmegaConf.create(text))
    except Exception as exc:  # noqa: BLE001 - a YAML syntax error becomes one line
        raise ConfigError("recipe", f"{source}: not a YAML mapping ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError("recipe", f"{source}: not a YAML mapping of config keys")
    return _flatten_overrides(tree)


def _flatten_overrides(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _flatten_overrides(value, f"{name}.")
        elif not prefix and key in GROUPS and isinstance(value, str):
            out.append(f"{name}={value}")  # a group choice
        else:
            out.append(f"{name}={override_value(value)}")
    return out


def expand_overrides(overrides: list[str]) -> list[str]:
    """The command line with `recipe=<name or file>` expanded (the command line wins) and `stages.*` opened."""
    expanded: list[str] = []
    for item in overrides:
        if _override_key(item) == "recipe":
            given = {_override_key(o) for o in overrides}
            expanded += [o for o in recipe_overrides(item.split("=", 1)[1]) if _override_key(o) not in given]
    expanded += [o for o in overrides if _override_key(o) != "recipe"]
    return [stage_override(o) for o in expanded]


def load_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose, type-check and validate; raise ConfigError naming the first bad key.

    config_name: "config" (pretrain.run) or "evaluate" (pretrain.evaluate).
    """
    _register_schemas()
    overrides = [quote_urls(o) for o in overrides]
    try:
        cfg = _compose(list(overrides), config_name)
        if config_name == "config" and _auto_preset_misfits(cfg, overrides):
            # No preset asked for, and the default CPU preset does not fit: the paper recipe.
            cfg = _compose([*overrides, "preset=none"], config_name)
        # Resolves interpolations and checks every value against its dataclass type.
        OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - Hydra/OmegaConf raise many types; all become one line
        raise _explain(exc, list(overrides), config_name) from None
    check = evaluate_problems if config_name == "evaluate" else find_problems
    problems = check(OmegaConf.to_object(cfg))
    if problems:
        raise ConfigError(*problems[0], more=tuple(problems[1:]))
    return cfg


def _auto_preset_misfits(cfg: DictConfig, overrides: list[str]) -> bool:
    """Whether the default `<objective>_cpu` preset was applied where it was not meant to go."""
    from pretrain.config import ModelConfig, cpu_preset_misfit

    if any(_override_key(o) == "preset" for o in overrides):
        return False  # asked for by name: kept, and refused by the config check if it does not fit
    model = ModelConfig(name=str(cfg.model.name), img_size=int(cfg.model.img_size))
    return bool(cpu_preset_misfit(str(cfg.preset_name), model, bool(cfg.trainer.use_gpu)))


def schema_for(objective_name: str) -> PretrainConfig:
    """A PretrainConfig whose objective node has the named objective's dataclass."""
    for cls in vars(objective_configs).values():
        if isinstance(cls, type) and issubclass(cls, objective_configs.ObjectiveConfig):
            if cls is not objective_configs.ObjectiveConfig and cls().name == objective_name:
                return PretrainConfig(objective=cls())
    raise ConfigError(
        "objective.name",
        f"unknown objective {objective_name!r}; valid choices: {', '.join(group_options('objective'))}",
    )


def resume_config(saved: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The saved config of a run with `key=value` overrides applied on top.

    Group choices (`objective=...`, `model=...`) cannot change on resume.
    """
    dotted, fixed = [], []
    for item in overrides:
        key = _override_key(item)
        if key == "resume":
            continue
        (dotted if "." in key else fixed).append(item)
    for item in fixed:
        key = item.split("=", 1)[0]
        if key in GROUPS:
            raise ConfigError(key, "cannot change a config group on resume; start a new run instead")
        dotted.append(item)
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(schema_for(saved["objective"]["name"])),
            saved,
            OmegaConf.from_dotlist(dotted),
        )
        problems = find_problems(OmegaConf.to_object(cfg))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - OmegaConf raises many types; all become one line
        raise _explain(exc, []) from None
    if problems:
        raise ConfigError(*problems[0], more=tuple(problems[1:]))
    return cfg
