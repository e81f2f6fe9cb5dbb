"""Text encoder adapters from a config: the base frozen in the training dtype, identified by the digest
of its fp32 weights; a checkpoint's adapter on another base is refused, naming both."""

from __future__ import annotations

import pytest
import torch

from sd3train.checkpoint.adapters import BASE_KEY
from sd3train.checkpoint.components import text_conditioner_from_config
from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.text_adapters import (
    RECORD_KEY,
    adapted_text_encoders_from_config,
    check_text_adapter_base,
    text_base_record,
)
from sd3train.config.adapter_schema import AdapterConfig
from sd3train.model.adapters import is_adapter_key, weights_digest
from tests.support.reference_models import text_config

ADAPTER = AdapterConfig(kind="lora", rank=4, alpha=8.0, text_encoders=["clip_g"])


def test_the_base_is_frozen_in_the_training_dtype_and_identified_by_its_fp32_digest():
    encoders, digests = adapted_text_encoders_from_config(text_config("tiny"), ADAPTER, None, torch.bfloat16)
    assert set(encoders) == set(digests) == {"clip_g"}
    for name, parameter in encoders["clip_g"].named_parameters():
        assert parameter.requires_grad == is_adapter_key(name)
        assert parameter.dtype == (torch.float32 if is_adapter_key(name) else torch.bfloat16), name
    assert digests["clip_g"] == weights_digest(text_conditioner_from_config(text_config("tiny")).clip_g.state_dict())
    assert not adapted_text_encoders_from_config(text_config("tiny"), AdapterConfig(kind="lora"), None, torch.float32)[0]


def test_an_adapter_on_another_base_is_refused_naming_both():
    checkpoint = {BASE_KEY: {RECORD_KEY: text_base_record(text_config("tiny"), {"clip_g": "a" * 32})}}
    check_text_adapter_base(checkpoint, {"clip_g": "a" * 32}, ["clip_g"])
    with pytest.raises(CheckpointError, match=r"random init \(text.init_seed=0\) \(digest a{32}\).* digest b{32}"):
        check_text_adapter_base(checkpoint, {"clip_g": "b" * 32}, ["clip_g"])
    with pytest.raises(CheckpointError, match="no clip_l adapter base record"):
        check_text_adapter_base(checkpoint, {"clip_l": "a" * 32}, ["clip_l"])


def test_a_checkpoint_with_its_text_bases_saved_loads_with_the_ema_adapters_merged(tmp_path):
    """Randomly initialised text encoders are saved whole (adapted bases under peft's names); the text
    loader merges the EMA adapters into them, as sampling encodes."""
    from sd3train.checkpoint import load_text_conditioner
    from sd3train.lit.module import SD3LitModule
    from tests.support.checkpoints import write_training_checkpoint
    from tests.support.config import tiny_config
    from tests.support.reference_models import relative_error

    (tmp_path / "base").mkdir()
    base = write_training_checkpoint(tmp_path / "base", "model.depth=1")
    module = SD3LitModule(tiny_config(tmp_path / "shapes", tmp_path / "runs", "model.depth=1", f"model.weights={base}",
                                      "adapter=lora", "adapter.text_encoders=[clip_l,clip_g]"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (module.text, module.text_ema.shadow):
            for name, parameter in sorted(model.named_parameters()):
                if is_adapter_key(name):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    checkpoint = {"state_dict": module.state_dict(), "global_step": 1}
    module.on_save_checkpoint(checkpoint)
    assert any(key.endswith("q_proj.base_layer.weight") for key in checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "last.ckpt")
    text = load_text_conditioner(tmp_path / "last.ckpt")
    prompts = ["a red circle", "two blue squares"]
    for got, ema, trained in zip(text.encode(prompts), module.sampling_text.encode(prompts), module.text.encode(prompts)):
        assert relative_error(got, ema) < 1e-5 and relative_error(got, trained) > 1e-3
