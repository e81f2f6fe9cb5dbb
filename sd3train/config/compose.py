"""Compose the training config from conf/ as sd3train-train does, on top of the schema's defaults.

    cfg = compose_config(["experiment=tiny_cpu", "trainer.max_steps=20"])   # a validated TrainConfig
    raw = compose_raw(["experiment=tiny_cpu"])                              # the DictConfig, unchecked
    model = group_option("model", "sd3_medium")                             # one group's plain values

Every composed config starts from `SCHEMA_DEFAULTS_NAME`: the defaults of the dataclasses in
`sd3train.config.schema`, registered in Hydra's ConfigStore as a plain mapping (a required field is
'???'). So every key exists for command-line overrides, `--cfg job` prints the whole config, and the
YAML files under conf/ hold only what differs from the schema: the schema is the one source of
defaults. The mapping is untyped on purpose: `sd3train.config.validate` type-checks it and lists
every problem at once, where OmegaConf's structured configs stop at the first.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from sd3train.config.schema import TrainConfig
from sd3train.config.typed import MISSING
from sd3train.paths import CONF_DIR

SCHEMA_DEFAULTS_NAME = "sd3train_schema"


def schema_defaults(cls: type) -> dict[str, Any]:
    """Every field of dataclass `cls` with its default, nested dataclasses as mappings; '???' where
    a field has none (a required value)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        elif dataclasses.is_dataclass(hints[field.name]):
            value = schema_defaults(hints[field.name])  # its own defaults, its required fields '???'
        else:
            value = MISSING
        values[field.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return values


def register_schema_defaults() -> None:
    """Put the schema's defaults into Hydra's ConfigStore (idempotent), where conf/config.yaml's
    defaults list finds them first. Whatever composes conf/ calls it first: `compose_raw` does, and
    sd3train/train.py before Hydra's main."""
    ConfigStore.instance().store(name=SCHEMA_DEFAULTS_NAME, node=schema_defaults(TrainConfig))


def compose_raw(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """conf/config.yaml composed with `overrides` (shard specs normalised as sd3train-train does);
    Hydra's own errors (an unknown option, a malformed override) propagate."""
    from hydra import compose, initialize_config_dir

    from sd3train.config.overrides import normalise_overrides

    register_schema_defaults()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=normalise_overrides(list(overrides)))


def group_option(group: str, option: str) -> dict[str, Any]:
    """The plain values `<group>=<option>` gives (conf/<group>/<option>.yaml over the schema's
    defaults; a required value left unset stays '???'), e.g. group_option("model", "sd3_medium")."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_raw([f"{group}={option}"])[group], resolve=True)


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The validated TrainConfig for `overrides`; ConfigError lists every problem."""
    from sd3train.config.validate import load_config

    return load_config(compose_raw(overrides))
