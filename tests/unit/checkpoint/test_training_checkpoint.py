"""A training checkpoint's stored config reads on any machine: settings that no longer exist and
callbacks that cannot be imported there do not stop export or sampling."""

from __future__ import annotations

import torch

from sd3train.checkpoint.training import read_training_checkpoint


def test_retired_settings_and_unimportable_callbacks_are_dropped(training_checkpoint, tmp_path):
    checkpoint = torch.load(training_checkpoint, map_location="cpu", weights_only=False)
    stored = checkpoint["sd3train_config"]["trainer"]
    # What an sd3train from before trainer.callbacks wrote, and a callback of the training cluster only.
    stored.update(debug_nan_loss_steps=[], debug_checkpoint_delay_s=0.0, debug_reseed_on_resume=False,
                  debug_step_delay_s=0.0, callbacks=["only_on_the_cluster.callbacks.Watchdog"])
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    config = read_training_checkpoint(old).config
    assert config.trainer.callbacks == [] and not hasattr(config.trainer, "debug_nan_loss_steps")
    assert config.model.depth == 2


def test_a_checkpoint_from_before_the_checkpointing_modes_reads_true_as_full(training_checkpoint, tmp_path):
    checkpoint = torch.load(training_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["sd3train_config"]["model"]["activation_checkpointing"] = True  # what it stored then
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert read_training_checkpoint(old).config.model.activation_checkpointing == "full"


def test_how_the_training_machine_ran_the_model_is_not_carried_over(training_checkpoint, tmp_path):
    checkpoint = torch.load(training_checkpoint, map_location="cpu", weights_only=False)
    # A run on GPUs with cuDNN attention, compiled, read on this CPU (where cudnn attention does not exist).
    checkpoint["sd3train_config"]["model"].update(attention_backend="cudnn", compile=True)
    checkpoint["sd3train_config"]["trainer"]["accelerator"] = "gpu"
    gpu_run = tmp_path / "gpu.ckpt"
    torch.save(checkpoint, gpu_run)
    model = read_training_checkpoint(gpu_run).config.model
    assert (model.attention_backend, model.compile) == ("auto", None)


def test_the_image_folder_a_run_trained_on_need_not_exist_where_it_is_read(training_checkpoint, tmp_path):
    """A LoRA trained on data=folder (with class images) samples and exports on a machine without them."""
    checkpoint = torch.load(training_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["sd3train_config"]["data"].update(path=str(tmp_path / "gone"), class_images=str(tmp_path / "gone2"),
                                                 class_prompt="a shape", val_shards=None)
    folder_run = tmp_path / "folder.ckpt"
    torch.save(checkpoint, folder_run)
    data = read_training_checkpoint(folder_run).config.data
    assert (data.path, data.class_images) == (None, None)
