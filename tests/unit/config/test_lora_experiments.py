"""experiment=lora_sd35_medium / lora_sd35_large: LoRA on the released models with the published
recipe; like finetune_sd35_medium they require paths.pretrained."""

from __future__ import annotations

import pytest

from sd3train.config.typed import ConfigError
from tests.support.config import compose_config

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
