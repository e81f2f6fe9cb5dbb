"""sd3train's own training checkpoints (.ckpt from sd3train-train) as a source of weights.

`checkpoint["state_dict"]` holds `mmdit.*`, `ema.shadow.*` (the EMA copy, when EMA is on),
`vae.*` and `text.*` (left out when those were loaded from weight files the config names), and
`checkpoint["sd3train_config"]` the plain training config. An adapter run's checkpoint holds only the
adapter's `mmdit.*` / `ema.shadow.*` weights (peft names) and `checkpoint["sd3train_adapter_base"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.files import read_lightning_checkpoint
from sd3train.checkpoint.formats import LIGHTNING_PREFIXES
from sd3train.config.schema import TrainConfig
from sd3train.config.typed import ConfigError
from sd3train.config.validate import load_config
from sd3train.model.adapters import is_adapter_key


@dataclass
class TrainingCheckpoint:
    path: Path
    state_dict: dict
    config: TrainConfig
    extra: dict = field(default_factory=dict)  # other sd3train_* entries (the adapter's base record)
    step: int | None = None  # the optimizer step it was saved at
    # The eval section as the run had it (config.eval has its metric suite off: see below).
    eval_settings: dict = field(default_factory=dict)

    def has(self, component: str) -> bool:
        prefix = LIGHTNING_PREFIXES[component]
        return any(key.startswith(prefix) for key in self.state_dict)

    def component(self, component: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The state dict of one component ("transformer", "ema", "vae", "text"), prefix removed."""
        prefix = LIGHTNING_PREFIXES[component]
        return {
            key[len(prefix):]: value.to(dtype) if dtype is not None and value.is_floating_point() else value
            for key, value in self.state_dict.items()
            if key.startswith(prefix)
        }

    def transformer(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The EMA weights when the run kept them (what samples best), else the trained weights. An
        adapter run's are its adapter alone (`transformer_loader.adapted_transformer` adds the base)."""
        return self.component("ema" if self.has("ema") else "transformer", dtype)

    def transformer_prefix(self) -> str:
        return LIGHTNING_PREFIXES["ema" if self.has("ema") else "transformer"]


# Settings older sd3train versions stored in checkpoints and that no longer exist; read, then dropped.
RETIRED_KEYS = {"trainer": ("debug_nan_loss_steps", "debug_checkpoint_delay_s", "debug_reseed_on_resume",
                            "debug_step_delay_s"),
                "eval": ("num_colour_prompts",)}  # now eval.samples_per_caption


def read_training_checkpoint(path: Path) -> TrainingCheckpoint:
    checkpoint = read_lightning_checkpoint(path)
    if "sd3train_config" not in checkpoint:
        raise CheckpointError(f"{path} has no sd3train_config: not a checkpoint written by sd3train-train")
    plain = dict(checkpoint["sd3train_config"])
    for section, keys in RETIRED_KEYS.items():
        plain[section] = {key: value for key, value in plain.get(section, {}).items() if key not in keys}
    # Where the run resumed from or started from does not matter for its weights, and those paths
    # need not exist on the machine that loads the checkpoint; nor do the callbacks it trained with.
    plain["trainer"] = {**plain.get("trainer", {}), "resume": "never", "callbacks": []}
    plain["paths"] = {**plain.get("paths", {}), "pretrained": None}
    # Nor does the image folder it trained on (data=folder) or its class images.
    plain["data"] = {**plain.get("data", {}), "path": None, "class_images": None}
    # Nor do the metric suite's files (Inception, OpenCLIP, reference): sd3train-eval checks the
    # settings it uses, from `eval_settings` and its own arguments.
    eval_settings = dict(plain.get("eval", {}))
    plain["eval"] = {**eval_settings, "suite": [], "every_n_steps": 0}
    # How the training machine ran the MM-DiT is no property of its weights: the attention kernel it
    # chose may not exist where the checkpoint is read (cudnn on a CPU), and compilation is that
    # machine's call. Older configs' activation_checkpointing true/false are read by load_config.
    plain["model"] = {**plain.get("model", {}), "compile": None, "attention_backend": "auto"}
    # The weights a run started from are in the checkpoint now; a frozen component it did not save
    # (see the module docstring) still comes from the file its config names.
    state_dict = checkpoint["state_dict"]
    unweighted = {"model": ("weights",), "vae": ("weights",),
                  "text": ("weights", "clip_l_weights", "clip_g_weights", "t5_weights")}
    # An adapter run saves its adapter alone: its base still comes from model.weights.
    adapter_run = plain.get("adapter", {}).get("kind", "none") != "none"
    # Text adapters (adapter.text_encoders) are saved without their base: only frozen weights count.
    saved = {"model": not adapter_run, **{section: any(key.startswith(LIGHTNING_PREFIXES[section]) and not is_adapter_key(key)
                                                       for key in state_dict) for section in ("vae", "text")}}
    for section, keys in unweighted.items():
        if saved[section]:
            plain[section] = {**plain.get(section, {}), **{key: None for key in keys}}
    try:
        config = load_config(plain)
    except ConfigError as error:
        raise CheckpointError(f"the training config stored in {path} is invalid: {error}") from error
    extra = {key: value for key, value in checkpoint.items() if key == "sd3train_adapter_base"}
    return TrainingCheckpoint(path, state_dict, config, extra, checkpoint.get("global_step"), eval_settings)
