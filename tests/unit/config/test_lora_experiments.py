"""experiment=lora_sd35_medium / lora_sd35_large: LoRA on the released models with the published
recipe; like finetune_sd35_medium they require paths.pretrained. experiment=lora_tiny_cpu: the CPU
demo on make train's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import sd3train
from sd3train.config.typed import ConfigError
from sd3train.data.shapes import all_specs
from tests.support.config import compose_config

REPO = Path(sd3train.__file__).resolve().parents[1]
RELEASES = {"lora_sd35_medium": (24, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 32, 2, 2),
            "lora_sd35_large": (38, [], 16, 1, 4)}


@pytest.mark.parametrize("experiment", list(RELEASES))
def test_the_lora_experiments_train_an_adapter_on_the_released_model(experiment, tmp_path):
    depth, dual, rank, batch, accumulate = RELEASES[experiment]
    cfg = compose_config(f"experiment={experiment}", f"paths.pretrained={tmp_path}")
    assert cfg.experiment_name == experiment
    assert (cfg.model.depth, list(cfg.model.dual_attention_layers)) == (depth, dual)
    assert cfg.model.weights == str(tmp_path) and cfg.text.weights == str(tmp_path)
    assert (cfg.adapter.kind, cfg.adapter.rank, cfg.adapter.alpha) == ("lora", rank, float(rank))
    assert cfg.adapter.targets == ["attention", "mlp"]
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (1e-4, batch, accumulate)
    assert (cfg.diffusion.density, cfg.diffusion.shift, cfg.trainer.precision) == ("logit_normal", 3.0, "bf16-mixed")


@pytest.mark.parametrize("experiment", list(RELEASES))
def test_the_released_weights_are_required(experiment):
    with pytest.raises(ConfigError, match="paths.pretrained: required value is missing"):
        compose_config(f"experiment={experiment}")


def test_the_cpu_demo_finetunes_make_trains_checkpoint_with_prior_preservation(tmp_path):
    """experiment=lora_tiny_cpu: shapes_cpu's model on make train's checkpoint, a LoRA taught the
    star from data/concepts/star, class images of the whole grammar, the star scored at the end."""
    cfg = compose_config("experiment=lora_tiny_cpu", f"model.weights={tmp_path}", f"data.path={tmp_path}")
    shapes_cpu = compose_config("experiment=shapes_cpu")
    assert cfg.model.patch_size == shapes_cpu.model.patch_size and cfg.model.depth == shapes_cpu.model.depth
    assert cfg.adapter.kind == "lora" and "modulation" in cfg.adapter.targets
    assert cfg.data.class_prompts == [spec.caption for spec in all_specs()] and cfg.data.class_prompt is None
    assert cfg.data.num_class_images >= len(all_specs()) and cfg.data.cache_latents and not cfg.data.cached
    assert cfg.eval.new_shapes == ["star"] and cfg.eval.samples_per_caption >= 3
    shipped = OmegaConf.load(REPO / "conf" / "experiment" / "lora_tiny_cpu.yaml")
    assert shipped["model"]["weights"] == "runs/shapes_cpu/main/checkpoints/last"
    assert shipped["data"]["path"] == "data/concepts/star"


def test_the_cpu_demo_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="data.path: .*missing-folder is not a folder"):
        compose_config("experiment=lora_tiny_cpu", f"model.weights={tmp_path}",
                       f"data.path={tmp_path / 'missing-folder'}")
