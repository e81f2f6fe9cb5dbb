"""sd3train-export as a user runs it: a training checkpoint -> a diffusers folder that
StableDiffusion3Pipeline loads and samples from, and a single file our loaders read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sd3train.checkpoint import load_text_conditioner, load_transformer
from tests.support.checkpoints import write_training_checkpoint

diffusers = pytest.importorskip("diffusers")
# Each test starts the console script (a fresh interpreter importing torch and transformers): 8-12 s.
pytestmark = pytest.mark.slow

# The console scripts sit next to the interpreter running the tests.
BIN = Path(sys.executable).parent


def export(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "sd3train-export"), *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_training_checkpoint(tmp_path_factory.mktemp("run"))


def test_diffusers_folder_loads_and_samples(checkpoint, tmp_path):
    out = tmp_path / "exported"
    result = export(f"checkpoint={checkpoint}", "format=diffusers", f"out={out}", "dtype=fp32")
    assert f"wrote {out}" in result.stdout
    pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(str(out), local_files_only=True)
    images = pipeline(prompt=["a red circle on a white background"], num_inference_steps=2, guidance_scale=3.0,
                      height=64, width=64, max_sequence_length=16, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01


def test_single_file_with_text_encoders_reads_back(checkpoint, tmp_path):
    out = tmp_path / "exported.safetensors"
    export(f"checkpoint={checkpoint}", "format=single_file", f"out={out}", "text_encoders=true", "dtype=bf16")
    loaded, expected = load_transformer(out, torch.bfloat16), load_transformer(checkpoint, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), expected.state_dict().values()))
    text = load_text_conditioner(out, dtype=torch.bfloat16, t5_tokenizer="data/tokenizers/t5_tiny")
    reference = load_text_conditioner(checkpoint, dtype=torch.bfloat16)
    prompts = ["a blue square on a black background"]
    assert all(torch.equal(a, b) for a, b in zip(text.encode(prompts), reference.encode(prompts)))
