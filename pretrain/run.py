"""`python -m pretrain.run [group=option ...] [key=value ...]`: compose, validate, train.

    python -m pretrain.run objective=mae model=vit_tiny trainer.max_steps=50
    python -m pretrain.run --cfg job          # print the resolved config, run nothing
    python -m pretrain.run resume=<run name or run directory>
    python -m pretrain.run objective=beitv2 pipeline.dry_run=true   # the stages it needs, run nothing
    python -m pretrain.run objective=beitv2 stages.mae.trainer.max_steps=100 stages.vqkd.trainer.max_steps=100
    python -m pretrain.run recipe=<name in pretrain/conf/recipes/ or a YAML file> [key=value ...]

Config mistakes exit with code 2 and one line naming the key and the valid choices,
before torch, Ray or MLflow are imported.
"""

from __future__ import annotations

import sys

USAGE = __doc__ or ""


def _parse(argv: list[str]) -> tuple[str | None, bool, list[str]]:
    show, help_, overrides = None, False, []
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            help_ = True
        elif arg in ("--cfg", "-c"):
            show = next(args, "job")
        elif arg.startswith("--cfg="):
            show = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise SystemExit(
                f"error: unknown option {arg!r}; options: --cfg job, --help (everything else is key=value)"
            )
        else:
            overrides.append(arg)
    return show, help_, overrides


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from pretrain.compose import GROUPS, ConfigError, expand_overrides, group_options, load_config, resume_config

    argv = sys.argv[1:] if argv is None else argv
    try:
        show, help_, overrides = _parse(argv)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    if help_:
        print(USAGE)
        for group in GROUPS:
            print(f"  {group:<10} {', '.join(group_options(group))}")
        return 0
    try:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(item, "expected key=value or group=option (e.g. objective=mae, trainer.max_steps=50)")
        overrides = expand_overrides(overrides)
        cfg = load_config(overrides)
        record = None
        place = None
        if cfg.resume:
            from pretrain.launch import place_for, read_run_record

            place = place_for(OmegaConf.to_object(cfg))
            record = read_run_record(place, OmegaConf.to_container(cfg.data.storage_options))
            if record is None:
                raise ConfigError(
                    "resume",
                    f"no run at {place.run_dir} (no pretrain_run.json there); check the name and trainer.storage_path",
                )
            cfg = resume_config(record["config"], overrides)
            cfg.resume = place.run_dir
    except ConfigError as exc:
        print(exc.lines(), file=sys.stderr)
        return 2
    if show is not None:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0

    from pretrain.trainer.worker import configure_logging

    configure_logging()
    if not cfg.resume and (cfg.pipeline.dry_run or _is_pipeline(cfg)):
        return _pipeline(cfg, overrides)
    from pretrain.launch import launch, place_for

    config = OmegaConf.to_object(cfg)
    return launch(config, place or place_for(config), record)


def _is_pipeline(cfg) -> bool:  # noqa: ANN001 - a DictConfig
    from pretrain.pipeline import is_pipeline

    return is_pipeline(cfg)


def _pipeline(cfg, overrides: list[str]) -> int:  # noqa: ANN001 - a DictConfig
    """Plan the stages, print the plan, and (unless pipeline.dry_run) run them."""
    from pretrain.compose import ConfigError
    from pretrain.pipeline import build_plan, print_plan, run_pipeline

    try:
        plan = build_plan(cfg, overrides)
    except ConfigError as exc:
        print(exc.lines(), file=sys.stderr)
        return 2
    text = print_plan(plan)
    if cfg.pipeline.dry_run:
        return 0
    return run_pipeline(plan, text)


if __name__ == "__main__":
    sys.exit(main())
