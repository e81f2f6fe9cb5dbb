"""The shipped Hydra config composes, and bad configs fail at compose time naming every problem."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from sd3train.config.compose import compose_raw
from sd3train.config.schema import TrainConfig
from sd3train.config.typed import ConfigError
from tests.support.config import compose_config


def test_tiny_cpu_composes_to_typed_config():
    cfg = compose_config("experiment=tiny_cpu")
    assert isinstance(cfg, TrainConfig)
    assert cfg.experiment_name == "tiny_cpu"
    assert cfg.model.context_dim == cfg.text.t5.d_model
    assert cfg.trainer.accelerator == "cpu"


def test_shapes_cpu_is_tiny_cpu_with_a_finer_patch_and_the_same_encoders():
    tiny, shapes = compose_config("experiment=tiny_cpu"), compose_config("experiment=shapes_cpu")
    assert shapes.experiment_name == "shapes_cpu"
    # The same VAE and text encoders: a cache precomputed for one fits the other.
    assert (shapes.vae, shapes.text, shapes.data.resolution) == (tiny.vae, tiny.text, tiny.data.resolution)
    assert (shapes.model.patch_size, shapes.model.sample_size, shapes.model.depth) == (1, 8, tiny.model.depth)
    assert shapes.data.cached and shapes.data.shards.startswith("data/shapes_cache/")
    assert shapes.eval.samples_per_caption == 3


def test_user_overrides_reach_typed_config():
    cfg = compose_config("experiment=tiny_cpu", "trainer.max_steps=20", "model.depth=2", "data.batch_size=4")
    assert (cfg.trainer.max_steps, cfg.model.depth, cfg.data.batch_size) == (20, 2, 4)


@pytest.mark.parametrize("model", ["sd3_medium", "sd35_medium", "sd35_large"])
def test_released_model_configs_compose_with_sd3_text(model, tmp_path):
    cfg = compose_config(f"model={model}", f"text.t5_tokenizer={tmp_path}")
    assert cfg.model.context_dim == 4096 and cfg.model.pooled_dim == 2048


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as error:
        compose_config("experiment=tiny_cpu", "model.depth=abc")
    assert "model.depth" in str(error.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as error:
        compose_config("experiment=tiny_cpu", "model.depth=abc", "trainer.max_steps=many", "+optim.learning_rate=1")
    message = str(error.value)
    assert len(error.value.problems) == 3
    for key in ("model.depth", "trainer.max_steps", "optim.learning_rate"):
        assert key in message


def test_unknown_key_without_plus_fails_in_hydra_naming_it():
    with pytest.raises(ConfigCompositionException, match="dept"):
        compose_raw(["experiment=tiny_cpu", "model.dept=2"])


def test_impossible_combinations_are_listed():
    with pytest.raises(ConfigError) as error:
        compose_config("experiment=tiny_cpu", "model.context_dim=64", "data.resolution=60", "diffusion.density=gaussian",
                       "optim.schedule=step", "data.latent_cache_max_samples=0")
    message = str(error.value)
    for key in ("model.context_dim", "data.resolution", "diffusion.density", "optim.schedule",
                "data.latent_cache_max_samples"):
        assert key in message


def test_missing_required_value_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"text.t5_tokenizer: required value is missing"):
        compose_config()  # the SD3 defaults need the user's T5 tokenizer folder


def test_cli_rejects_bad_override_before_building_anything(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sd3train.train", "experiment=tiny_cpu", "model.depth=abc",
         "data.batch_size=four", f"paths.runs_dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "model.depth" in result.stderr and "data.batch_size" in result.stderr
    assert not any(tmp_path.glob("tiny_cpu/*/checkpoints"))


def test_skip_layer_guidance_settings_are_checked_against_the_model():
    with pytest.raises(ConfigError) as error:
        compose_config("experiment=tiny_cpu", "diffusion.sampler.skip_layers=[1,4]",
                       "diffusion.sampler.skip_layer_stop=0.005")
    assert error.value.problems == [
        "diffusion.sampler.skip_layers: [4] outside the model's joint blocks 0..3",
        "diffusion.sampler.skip_layer_start/stop: need 0 <= start < stop <= 1, got 0.01, 0.005",
    ]
    with pytest.raises(ConfigError, match="skip_layer_scale: 2.5 needs diffusion.sampler.skip_layers"):
        compose_config("experiment=tiny_cpu", "diffusion.sampler.skip_layer_scale=2.5")
    cfg = compose_config("experiment=tiny_cpu", "diffusion.sampler.skip_layers=[1,2]",
                         "diffusion.sampler.skip_layer_scale=2.5")
    assert (cfg.diffusion.sampler.skip_layers, cfg.diffusion.sampler.skip_layer_scale) == ([1, 2], 2.5)


def test_weight_paths_that_do_not_exist_are_each_named(tmp_path):
    with pytest.raises(ConfigError) as error:
        compose_config("experiment=tiny_cpu", f"model.weights={tmp_path}/mmdit.safetensors",
                       f"text.clip_g_weights={tmp_path}/g")
    assert error.value.problems == [
        f"model.weights: {tmp_path}/mmdit.safetensors does not exist",
        f"text.clip_g_weights: {tmp_path}/g does not exist",
    ]
