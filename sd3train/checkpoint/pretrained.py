"""Training components from the weights a config names (`model.weights`, `vae.weights`).

`MMDiT.from_config` and `VAE.from_config` come here when their config names weights, so a finetune
starts from released weights in any layout `load_transformer` / `load_vae` read (Stability single
file, diffusers pipeline or component folder, our .ckpt). The config stays the source of truth: the
weights must be the architecture it describes, and anything the weights cannot tell (training
options of the MM-DiT, the VAE's latent shift and scale) comes from it. The model is built on the
meta device and adopts the loaded tensors, so an 8B checkpoint costs its own size once.
"""

from __future__ import annotations

import torch

from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.transformer_loader import build_transformer, read_transformer
from sd3train.checkpoint.vae_loader import build_vae, read_vae
from sd3train.config.schema import ModelConfig, VAEConfig
from sd3train.model.mmdit import MMDiT
from sd3train.model.vae import VAE, resolve_weights_file
from sd3train.paths import resolve_repo_path

# What the weights fix; the other ModelConfig fields are training options or derived from these.
# sample_size only shapes the initial position table, which the weights replace.
MMDIT_ARCHITECTURE = (
    "depth", "hidden_size", "num_heads", "patch_size", "in_channels", "out_channels", "mlp_ratio",
    "context_dim", "pooled_dim", "pos_embed_max_size", "qk_norm", "dual_attention_layers", "qkv_bias",
)
# What a VAE's weight shapes fix (norm groups and the latent factors do not show in them).
VAE_ARCHITECTURE = ("in_channels", "latent_channels", "block_out_channels", "layers_per_block", "use_quant_conv")


def _resolved_mmdit(config: ModelConfig) -> dict:
    """The architecture fields with the None defaults filled in as MMDiT does."""
    values = {name: getattr(config, name) for name in MMDIT_ARCHITECTURE}
    values["hidden_size"] = values["hidden_size"] or 64 * config.depth
    values["num_heads"] = values["num_heads"] or config.depth
    values["out_channels"] = values["out_channels"] or config.in_channels
    values["mlp_ratio"] = float(values["mlp_ratio"])
    values["dual_attention_layers"] = sorted(set(values["dual_attention_layers"]))
    return values


def architecture_problems(section: str, configured: dict, found: dict, source: object) -> list[str]:
    """One line per field where the weights at `source` disagree with the config."""
    return [
        f"{section}.{name}: the config says {configured[name]!r}, the weights in {source} are {found[name]!r}"
        for name in configured
        if configured[name] != found[name]
    ]


def _raise_if_any(problems: list[str], key: str, path: str) -> None:
    if problems:
        raise CheckpointError(
            f"{key}={path} is not the configured architecture ({len(problems)} problem(s)):\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )


def pretrained_mmdit(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> MMDiT:
    """The MM-DiT `cfg` describes, holding the weights `cfg.weights` names, ready to train."""
    found, state, where, prefix = read_transformer(resolve_repo_path(cfg.weights), dtype)
    _raise_if_any(architecture_problems("model", _resolved_mmdit(cfg), _resolved_mmdit(found), where),
                  "model.weights", cfg.weights)
    model = build_transformer(cfg, state, where, prefix)
    return model.train().requires_grad_(True)


def pretrained_vae(cfg: VAEConfig, dtype: torch.dtype = torch.float32) -> VAE:
    """The frozen VAE `cfg` describes (its shift and scale too), holding the weights `cfg.weights` names."""
    path = resolve_repo_path(cfg.weights)
    if path.is_dir() and not any((path / name / "config.json").is_file() for name in ("", "vae")):
        path = resolve_weights_file(path)  # a folder holding only a weights file (data/vae_tiny-style)
    found, state, where, prefix = read_vae(path, dtype, norm_num_groups=cfg.norm_num_groups)
    configured = {name: getattr(cfg, name) for name in VAE_ARCHITECTURE}
    loaded = {name: getattr(found, name) for name in VAE_ARCHITECTURE}
    configured["block_out_channels"] = list(configured["block_out_channels"])
    loaded["block_out_channels"] = list(loaded["block_out_channels"])
    _raise_if_any(architecture_problems("vae", configured, loaded, where), "vae.weights", cfg.weights)
    return build_vae(cfg, state, where, prefix).requires_grad_(False)
