"""Weight files: sharded folders, selective reads with dtype, atomic writes."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.files import (
    read_component_weights,
    read_safetensors,
    safetensors_header,
    save_safetensors_atomic,
    with_prefix,
)


def test_sharded_folder_is_merged_through_its_index(tmp_path):
    save_file({"a.weight": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    state = read_component_weights(tmp_path, dtype=torch.float16)
    assert set(state) == {"a.weight", "b.weight"} and state["a.weight"].dtype == torch.float16
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names missing file.*model-00002-of-00002"):
        read_component_weights(tmp_path)


def test_prefix_selection_reads_only_that_component(tmp_path):
    path = tmp_path / "file.safetensors"
    save_file({"first_stage_model.x": torch.ones(1), "model.diffusion_model.y": torch.ones(2)}, str(path))
    assert list(read_safetensors(path, select=with_prefix("model.diffusion_model."))) == ["y"]


def test_atomic_write_leaves_no_temporary_file_and_keeps_metadata(tmp_path):
    target = tmp_path / "out" / "w.safetensors"
    save_safetensors_atomic({"a": torch.arange(4.0)}, target, {"sd3train": "{}"})
    assert safetensors_header(target) == (["a"], {"sd3train": "{}"})
    assert [p.name for p in target.parent.iterdir()] == ["w.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not tempfile's 0600
    with pytest.raises(Exception):
        save_safetensors_atomic({"a": "not a tensor"}, target)
    assert [p.name for p in target.parent.iterdir()] == ["w.safetensors"]  # old file intact, no leftovers
    assert safetensors_header(target)[0] == ["a"]
