"""The MM-DiT's training options in the config (model.activation_checkpointing, .activation_checkpointing_every,
.compile, .attention_backend): validated at compose time naming each bad value, older true/false settings
read as full/none, and the config's choices are the model's.

    python -m pytest tests/unit/model/test_model_options.py -q
"""

from __future__ import annotations

import pytest

from sd3train.config import validate
from sd3train.config.typed import ConfigError, to_plain
from sd3train.config.validate import load_config
from sd3train.model.activation_checkpointing import ACTIVATION_CHECKPOINTING
from sd3train.model.attention import ATTENTION_BACKENDS
from sd3train.model.mmdit import MMDiT
from tests.support.config import compose_config


def tiny(*overrides: str):
    return compose_config("experiment=tiny_cpu", "trainer.accelerator=cpu", *overrides)


def test_config_choices_are_the_models():
    assert validate.ACTIVATION_CHECKPOINTING_MODES == ACTIVATION_CHECKPOINTING
    assert validate.ATTENTION_BACKENDS == tuple(ATTENTION_BACKENDS)


def test_defaults_are_no_checkpointing_auto_compile_and_auto_attention():
    model = tiny().model
    assert (model.activation_checkpointing, model.activation_checkpointing_every) == ("none", 2)
    assert model.compile is None and model.attention_backend == "auto"


def test_every_bad_value_is_named_at_once():
    with pytest.raises(ConfigError) as caught:
        tiny("model.activation_checkpointing=sometimes", "model.activation_checkpointing_every=0",
             "model.attention_backend=xformers")
    assert caught.value.problems == [
        "model.activation_checkpointing: 'sometimes' is not one of none, full, selective, every_k",
        "model.activation_checkpointing_every: must be >= 1, got 0",
        "model.attention_backend: 'xformers' is not one of auto, flash, cudnn, efficient, math",
    ]


def test_compile_true_is_refused_with_deepspeed_naming_both_keys():
    with pytest.raises(ConfigError) as caught:
        tiny("strategy=zero2", "model.compile=true")
    assert caught.value.problems == ["model.compile: true does not work with strategy.name=deepspeed (ZeRO); "
                                     "use strategy=ddp or model.compile=null"]
    assert tiny("strategy=zero2").model.compile is None  # left to resolve: off with DeepSpeed
    assert tiny("model.compile=true").model.compile is True


@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_cuda_only_attention_on_a_cpu_run_is_refused(backend):
    with pytest.raises(ConfigError, match=f"model.attention_backend: {backend} attention needs a CUDA device"):
        tiny(f"model.attention_backend={backend}")
    assert tiny("model.attention_backend=flash").model.attention_backend == "flash"


@pytest.mark.parametrize("old,mode", [("true", "full"), ("false", "none")])
def test_old_true_false_on_the_command_line_read_as_full_and_none(old, mode):
    assert tiny(f"model.activation_checkpointing={old}").model.activation_checkpointing == mode


def test_a_stored_config_from_before_the_modes_loads():
    # What checkpoints written before the modes existed hold: a plain config with a bool.
    stored = validate.upgrade_retired_values({"model": {"depth": 2, "activation_checkpointing": True}, "seed": 1})
    assert stored == {"model": {"depth": 2, "activation_checkpointing": "full"}, "seed": 1}
    plain = to_plain(tiny())
    plain["model"]["activation_checkpointing"] = True
    assert load_config(plain).model.activation_checkpointing == "full"


def test_the_model_built_from_the_config_uses_its_options():
    cfg = tiny("model.activation_checkpointing=every_k", "model.activation_checkpointing_every=3",
               "model.attention_backend=math", "model.depth=3").model
    model = MMDiT.from_config(cfg)
    assert [block.checkpointing for block in model.joint_blocks] == ["none", "none", "full"]
    assert model.attention_backend == "math"


def test_the_finetune_experiment_checkpoints_every_block(tmp_path):
    cfg = compose_config("experiment=finetune_sd35_medium", f"paths.pretrained={tmp_path}")
    assert cfg.model.activation_checkpointing == "full"
