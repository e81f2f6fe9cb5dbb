"""One source of defaults: the schema's dataclasses. Every composed config starts from them, so every
key can be overridden on the command line, and no group file under conf/ restates one."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from sd3train.config.compose import compose_raw, schema_defaults
from sd3train.config.schema import TrainConfig
from sd3train.config.typed import MISSING
from sd3train.paths import CONF_DIR

GROUPS = ("model", "vae", "text", "diffusion", "data", "optim", "trainer", "strategy", "logger")


def flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def restated_defaults(group: str, values: dict) -> list[str]:
    """Keys of a group file whose value is the schema's default anyway."""
    defaults = flat(schema_defaults(TrainConfig)[group])
    return sorted(key for key, value in flat(values).items() if key in defaults and defaults[key] == value
                  and value != MISSING)


def schema_keys(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    keys = set()
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys |= schema_keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            keys.add(f"{prefix}{field.name}")
    return keys


@pytest.mark.parametrize("file", sorted(path for group in GROUPS for path in (CONF_DIR / group).glob("*.yaml")),
                         ids=lambda path: f"{path.parent.name}/{path.name}")
def test_no_group_file_restates_a_schema_default(file: Path):
    values = yaml.safe_load(file.read_text()) or {}
    values.pop("defaults", None)
    assert restated_defaults(file.parent.name, values) == []


def test_a_restated_default_is_found():
    assert restated_defaults("model", {"depth": 24, "patch_size": 2, "qk_norm": "rms"}) == ["patch_size"]
    assert restated_defaults("text", {"clip_g": {"hidden_act": "quick_gelu", "num_layers": 2}}) == ["clip_g.hidden_act"]


@pytest.mark.parametrize("overrides", [[], ["experiment=tiny_cpu"], ["model=tiny", "data=webdataset"]])
def test_every_schema_key_is_in_the_composed_config(overrides):
    composed = OmegaConf.to_container(compose_raw(overrides), resolve=False)
    composed.pop("hydra", None)
    assert set(flat(composed)) >= schema_keys(TrainConfig)


def test_a_key_only_the_schema_sets_takes_a_plain_override():
    raw = compose_raw(["experiment=tiny_cpu", "model.activation_checkpointing=true", "diffusion.mode_scale=1.0"])
    assert raw.model.activation_checkpointing is True and raw.diffusion.mode_scale == 1.0
