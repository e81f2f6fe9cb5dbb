"""experiment=finetune_sd35_medium requires paths.pretrained, and a wrong path fails before anything is built."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from sd3train.config.typed import ConfigError, to_plain
from sd3train.config.validate import load_config
from tests.support.config import compose_config


def finetune_config(*overrides: str):
    return compose_config("experiment=finetune_sd35_medium", *overrides)


def test_unset_pretrained_path_is_reported_as_required():
    with pytest.raises(ConfigError) as error:
        finetune_config()
    assert error.value.problems == [
        "paths.pretrained: required value is missing (the released SD3.5-Medium weights this experiment finetunes)"
    ]


def test_required_value_is_listed_once_beside_other_unresolvable_values():
    # vae.weights, text.weights and text.t5_tokenizer all interpolate paths.pretrained.
    with pytest.raises(ConfigError) as error:
        finetune_config("run_name=${no_such_key}")
    assert len(error.value.problems) == 2
    assert error.value.problems[0].startswith("paths.pretrained: required value is missing")
    assert "no_such_key" in error.value.problems[1]


def test_missing_pretrained_path_is_named():
    with pytest.raises(ConfigError, match="paths.pretrained: /nonexistent/sd35 does not exist"):
        finetune_config("paths.pretrained=/nonexistent/sd35")


def test_existing_folder_composes_into_a_finetune_of_sd35_medium(tmp_path):
    cfg = finetune_config(f"paths.pretrained={tmp_path}")
    assert cfg.paths.pretrained == str(tmp_path)
    # The VAE, text encoders and T5 tokenizer come from the same pipeline folder.
    assert cfg.vae.weights == cfg.text.weights == str(tmp_path)
    assert cfg.text.t5_tokenizer == f"{tmp_path}/tokenizer_3"
    assert (cfg.model.depth, cfg.model.pos_embed_max_size, len(cfg.model.dual_attention_layers)) == (24, 384, 13)
    assert cfg.model.activation_checkpointing and cfg.model.pos_embed_random_crop
    assert (cfg.optim.lr, cfg.trainer.precision) == (1e-5, "bf16-mixed")


def test_stored_config_reloads_without_the_pretrained_path(tmp_path):
    # A checkpoint's config is reloaded with paths.pretrained=None (sd3train.checkpoint.training):
    # the requirement lives in the experiment file, not in the stored values.
    plain = to_plain(finetune_config(f"paths.pretrained={tmp_path}"))
    plain["paths"]["pretrained"] = None
    reloaded = load_config(plain)
    assert reloaded.paths.pretrained is None
    assert dataclasses.asdict(reloaded.model) == plain["model"]


def test_cli_rejects_missing_pretrained_path_before_building_anything(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sd3train.train", "experiment=finetune_sd35_medium",
         "paths.pretrained=/nonexistent/sd35", f"paths.runs_dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "paths.pretrained: /nonexistent/sd35 does not exist" in result.stderr
    assert not any(tmp_path.rglob("checkpoints"))
