"""Shard file names: one name for every url form, and a data error (a ValueError) for a url that names no tar."""

from __future__ import annotations

import pytest

from sd3train.data.shard_names import ShardNameError, shard_file_name


def test_every_url_form_and_compressed_tars_give_the_plain_tar_name():
    assert shard_file_name("a/00001.tar") == "00001.tar"
    assert shard_file_name("file:/data/00001.tgz") == "00001.tar"
    assert shard_file_name("https://host/data/00001.tar.xz?download=1") == "00001.tar"
    assert shard_file_name("pipe:aws s3 cp 's3://bucket/train x/00001.tar.gz' -") == "00001.tar"


def test_a_url_that_names_no_tar_is_a_value_error_naming_the_url():
    with pytest.raises(ShardNameError, match=r"cannot name the cache shard for 'pipe:cat /data/shard'") as caught:
        shard_file_name("pipe:cat /data/shard")
    assert isinstance(caught.value, ValueError)  # what config validation catches
    with pytest.raises(ShardNameError):
        shard_file_name(".tar")
