"""Reading what sd3train-train publishes: a step directory, the `last` link, the checkpoint.ckpt
inside (a file, or a DeepSpeed ZeRO directory consolidated to fp32); an unfinished one is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.files import read_lightning_checkpoint
from sd3train.checkpoint.formats import LIGHTNING, detect
from sd3train.checkpoint.step_dirs import training_checkpoint_file
from sd3train.sample import default_out_dir


def publish_step(checkpoints: Path, step: int, *, complete: bool = True) -> Path:
    directory = checkpoints / f"step-{step:07d}"
    directory.mkdir(parents=True)
    torch.save({"state_dict": {"mmdit.w": torch.full((2,), float(step))}, "global_step": step},
               directory / "checkpoint.ckpt")
    (directory / "config.yaml").write_text("{}\n")
    if complete:
        (directory / "COMPLETE").write_text(json.dumps({"step": step}))
    return directory


def test_a_step_directory_and_last_read_as_the_checkpoint_inside(tmp_path):
    step = publish_step(tmp_path / "checkpoints", 20)
    os.symlink(step.name, tmp_path / "checkpoints" / "last")
    for path in (step, tmp_path / "checkpoints" / "last", step / "checkpoint.ckpt"):
        assert detect(path).kind == LIGHTNING
        checkpoint = read_lightning_checkpoint(path)
        assert checkpoint["global_step"] == 20 and torch.equal(checkpoint["state_dict"]["mmdit.w"], torch.full((2,), 20.0))


def test_an_unfinished_step_directory_is_refused_naming_itself(tmp_path):
    step = publish_step(tmp_path, 4, complete=False)
    with pytest.raises(CheckpointError, match=r"step-0000004 is not a complete checkpoint \(no COMPLETE marker\)"):
        read_lightning_checkpoint(step)
    # The file itself can still be named by a user who knows it is whole.
    assert training_checkpoint_file(step / "checkpoint.ckpt") == step / "checkpoint.ckpt"
    assert read_lightning_checkpoint(step / "checkpoint.ckpt")["global_step"] == 4


def test_a_directory_that_is_no_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "weird.ckpt"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        read_lightning_checkpoint(folder)


def test_samples_go_to_the_run_directory_named_by_step(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    step = publish_step(checkpoints, 100)
    os.symlink(step.name, checkpoints / "last")
    expected = tmp_path / "run" / "samples" / "step-0000100"
    assert default_out_dir(step) == default_out_dir(checkpoints / "last") == expected
    assert default_out_dir(step / "checkpoint.ckpt") == expected
    assert default_out_dir(tmp_path / "run" / "checkpoints" / "old.ckpt") == tmp_path / "run" / "samples" / "old"


# A DeepSpeed engine (ZeRO 2 and 3, one CPU process) saves what Lightning's DeepSpeed strategy saves:
# the LightningModule under `_forward_module` (Lightning's wrapper), Lightning's own state as
# client_state (everything but state_dict and optimizer_states), tag "checkpoint".
WRITE_ZERO_CHECKPOINTS = textwrap.dedent("""
    import sys, torch, deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    class Lit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mmdit = torch.nn.Linear(4, 8)
            self.vae = torch.nn.Linear(8, 2)
            self.vae.requires_grad_(False)  # frozen, as the VAE and text encoders are
            self.register_buffer("ema_step", torch.tensor(3.0))
        def forward(self, x):
            return self.vae(self.mmdit(x))
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self._forward_module = module
        def forward(self, x):
            return self._forward_module(x)
    for stage in (2, 3):
        torch.manual_seed(stage)
        lit = Lit()
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=Wrapper(lit), config=config,
                                          model_parameters=[p for p in lit.parameters() if p.requires_grad])
        engine.backward(engine(torch.randn(2, 4)).sum())
        engine.step()
        out = sys.argv[1] + f"/zero{stage}/checkpoint.ckpt"
        engine.save_checkpoint(out, tag="checkpoint",
                               client_state={"global_step": 1, "epoch": 0, "sd3train_config": {"run_name": "z"}})
        with deepspeed.zero.GatheredParameters(list(lit.parameters()), modifier_rank=None):
            torch.save({k: v.detach().clone().float() for k, v in lit.state_dict().items()}, out + ".expected.pt")
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def zero_checkpoints(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-c", WRITE_ZERO_CHECKPOINTS, str(out)], cwd=out, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out


@pytest.mark.slow  # a DeepSpeed process: about 10 s
@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_checkpoint_directory_is_consolidated_to_a_lightning_checkpoint(zero_checkpoints, stage):
    folder = zero_checkpoints / f"zero{stage}" / "checkpoint.ckpt"
    expected = torch.load(str(folder) + ".expected.pt", weights_only=True)
    assert detect(folder).kind == LIGHTNING
    checkpoint = read_lightning_checkpoint(folder)
    assert checkpoint["global_step"] == 1 and checkpoint["sd3train_config"] == {"run_name": "z"}
    assert not {"module", "optimizer", "ds_config", "param_shapes"} & set(checkpoint)  # DeepSpeed's own state
    state = checkpoint["state_dict"]
    assert set(state) == set(expected) == {"mmdit.weight", "mmdit.bias", "vae.weight", "vae.bias", "ema_step"}
    for key, value in expected.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value), key

    # Published: the ZeRO directory inside a step directory, read through the step directory.
    step = zero_checkpoints / f"published{stage}" / "step-0000001"
    step.mkdir(parents=True)
    os.symlink(folder, step / "checkpoint.ckpt")
    (step / "COMPLETE").write_text(json.dumps({"step": 1}))
    assert detect(step).kind == LIGHTNING
    assert set(read_lightning_checkpoint(step)["state_dict"]) == set(expected)


def test_a_copied_step_directory_reads_under_any_name_but_is_not_resumed_by_name(tmp_path):
    from sd3train.checkpoint.step_dirs import IncompleteCheckpointError, resolve_resume_path

    copy = publish_step(tmp_path, 9).rename(tmp_path / "my-finetune")
    assert read_lightning_checkpoint(copy)["global_step"] == 9  # export, sampling, model.weights
    with pytest.raises(IncompleteCheckpointError, match="my-finetune is not a complete checkpoint"):
        resolve_resume_path(copy)  # resume goes by step directories
