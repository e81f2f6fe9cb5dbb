"""Shared checkpoints for the loader and export tests: a tiny random diffusers pipeline (object and
saved folder) and a tiny sd3train training checkpoint, each built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.checkpoints import write_training_checkpoint
from tests.support.reference_models import tiny_sd3_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline():
    """(StableDiffusion3Pipeline, T5 token count) with random tiny components, shift 3."""
    pytest.importorskip("diffusers")
    return tiny_sd3_pipeline(shift=3.0)


@pytest.fixture(scope="session")
def tiny_pipeline_folder(tiny_pipeline, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-sd3"
    tiny_pipeline[0].save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def training_checkpoint(tmp_path_factory) -> Path:
    """A tiny .ckpt from sd3train-train's code path (see tests/support/config.write_training_checkpoint)."""
    return write_training_checkpoint(tmp_path_factory.mktemp("run"))
