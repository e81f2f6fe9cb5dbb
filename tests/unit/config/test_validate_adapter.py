"""adapter.text_encoders is checked at compose time: unknown or repeated names, and text adapters
without an adapter kind, fail naming the problem; CLIP-L and bigG compose, on the cache too."""

from __future__ import annotations

import pytest

from sd3train.config.typed import ConfigError
from tests.support.config import compose_config

BASE = ("experiment=tiny_cpu", "trainer.accelerator=cpu", "model.weights=README.md")


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        compose_config(*BASE, *overrides)
    return error.value.problems


def test_unknown_and_repeated_encoders_are_named():
    found = problems("adapter=lora", "adapter.text_encoders=[clip_l,t5,clip_l]")
    assert any("adapter.text_encoders: ['t5'] are not among ['clip_l', 'clip_g']" in line for line in found)
    assert any("adapter.text_encoders: ['clip_l'] named more than once" in line for line in found)


def test_text_adapters_need_an_adapter_kind():
    found = problems("adapter.text_encoders=[clip_g]")
    assert any("adapter.text_encoders: set, but adapter.kind is none" in line for line in found)


@pytest.mark.parametrize("cached", ["false", "true"])
def test_clip_l_and_bigg_compose_with_or_without_the_cache(cached):
    cfg = compose_config(*BASE, "adapter=lora", "adapter.text_encoders=[clip_l,clip_g]", f"data.cached={cached}",
                         "data.shards='/nowhere/cache/train-{000000..000001}.tar'")  # not checked before it exists
    assert cfg.adapter.text_encoders == ["clip_l", "clip_g"]
