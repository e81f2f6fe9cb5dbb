"""Shard overrides survive the shell's brace expansion and Hydra's grammar."""

from __future__ import annotations

import braceexpand
from hydra.core.override_parser.overrides_parser import OverridesParser

from sd3train.config.overrides import normalise_overrides


def _hydra_value(arg: str) -> str:
    (override,) = OverridesParser.create().parse_overrides([arg])
    return override.value()


def test_unquoted_braces_reach_hydra_as_the_spec_the_user_wrote():
    (arg,) = normalise_overrides(["data.shards=/data/out/{00000..00009}.tar"])
    assert _hydra_value(arg) == "/data/out/{00000..00009}.tar"


def test_shell_expanded_words_become_one_list():
    words = list(braceexpand.braceexpand("data.shards=/data/out/{00000..00002}.tar"))
    assert len(words) == 3
    args = normalise_overrides(["experiment=tiny_cpu", *words, "trainer.max_steps=3"])
    assert args[0] == "experiment=tiny_cpu" and args[2] == "trainer.max_steps=3"
    assert _hydra_value(args[1]) == "/data/out/00000.tar::/data/out/00001.tar::/data/out/00002.tar"


def test_quoted_null_pipe_and_other_arguments_are_kept():
    assert normalise_overrides(["data.val_shards=null", "model.depth=2"]) == ["data.val_shards=null", "model.depth=2"]
    assert normalise_overrides(["data.shards='a-{0..1}.tar'"]) == ["data.shards='a-{0..1}.tar'"]
    (arg,) = normalise_overrides(["+data.shards=pipe:aws s3 cp s3://b/{000..009}.tar -"])
    assert arg.startswith("+data.shards=") and _hydra_value(arg) == "pipe:aws s3 cp s3://b/{000..009}.tar -"
