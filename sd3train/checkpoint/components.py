"""Training components from a config, holding the weights it names (`model.weights`, `vae.weights`, `text.*weights`).

    mmdit = mmdit_from_config(cfg.model)          # trainable; random init when model.weights is None
    vae = vae_from_config(cfg.vae)                # frozen
    text = text_conditioner_from_config(cfg.text) # frozen; tokenizers from the folders the config names

A finetune starts from released weights in any layout `load_transformer` / `load_vae` /
`encoder_files.load_text_encoder` read (Stability single file, diffusers pipeline or component
folder, our .ckpt). The config stays the source of truth: the weights must be the architecture it
describes, and anything the weights cannot tell (training options of the MM-DiT, the VAE's latent
shift and scale) comes from it. Models are built on the meta device and adopt the loaded tensors,
so an 8B checkpoint costs its own size once. Without weights, each is the model's own random init
(`MMDiT.from_config`, `VAE.from_config`, `TextConditioner.from_config`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sd3train.checkpoint.encoder_files import load_text_encoder
from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.formats import TEXT_ENCODER_SUBFOLDERS
from sd3train.checkpoint.tokenizer_files import config_tokenizers, resolve_config_path
from sd3train.checkpoint.transformer_loader import build_transformer, read_transformer
from sd3train.checkpoint.vae_loader import build_vae, read_vae, resolve_weights_file
from sd3train.config.schema import AdapterConfig, ModelConfig, TextConfig, VAEConfig
from sd3train.model.mmdit import MMDiT
from sd3train.model.text_encoders import (
    ENCODER_NAMES,
    TextConditioner,
    configured_dropout,
    prompt_tokenizers,
    random_encoder,
)
from sd3train.model.vae import VAE
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


def mmdit_from_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> MMDiT:
    """The MM-DiT `cfg` describes, ready to train: holding the weights `cfg.weights` names, else
    randomly initialised."""
    if cfg.architecture == "crossattn_dit":  # the architecture study's baseline (validation keeps it plain)
        from sd3train.model.crossattn_dit import CrossAttentionDiT

        return CrossAttentionDiT.from_config(cfg).to(dtype)
    if cfg.weights is None:
        return MMDiT.from_config(cfg).to(dtype)
    found, state, where, prefix = read_transformer(resolve_repo_path(cfg.weights), dtype)
    _raise_if_any(architecture_problems("model", _resolved_mmdit(cfg), _resolved_mmdit(found), where),
                  "model.weights", cfg.weights)
    model = build_transformer(cfg, state, where, prefix)
    return model.train().requires_grad_(True)


def adapted_mmdit_from_config(cfg: ModelConfig, adapter: AdapterConfig, base_dtype: torch.dtype) -> tuple[MMDiT, str]:
    """The MM-DiT of `cfg` with `adapter`'s adapters on it (started from `cfg.adapter_weights` when set),
    and the digest of its base weights. The base is frozen and held in `base_dtype` (no fp32 master
    copy); the adapters stay fp32."""
    from sd3train.checkpoint.lora_formats import read_lora_file
    from sd3train.model.adapters import apply_adapter_config, load_adapter_state_dict, weights_digest

    model = mmdit_from_config(cfg)
    digest = weights_digest(model.state_dict())
    apply_adapter_config(model, adapter)
    if cfg.adapter_weights is not None:
        load_adapter_state_dict(model, read_lora_file(
            resolve_repo_path(cfg.adapter_weights), [name for name, _ in model.named_modules()],
            adapter.alpha, adapter.rank, cfg.depth, cfg.dual_attention_layers, adapter.text_encoders))
    for parameter in model.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(base_dtype)
    return model, digest


def vae_from_config(cfg: VAEConfig, dtype: torch.dtype = torch.float32) -> VAE:
    """The frozen VAE (eval mode, no gradients) `cfg` describes, its shift and scale too: holding the
    weights `cfg.weights` names, else randomly initialised."""
    if cfg.weights is None:
        return VAE.from_config(cfg).to(dtype).requires_grad_(False).eval()
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


def weight_sources(cfg: TextConfig) -> dict[str, str]:
    """Where each encoder's weights come from: its own `<name>_weights`, else `weights` (a pipeline
    folder or single file); encoders missing here are randomly initialised."""
    return {name: path for name in ENCODER_NAMES if (path := getattr(cfg, f"{name}_weights") or cfg.weights)}


def _check_pipeline_folder(folder: Path, names: list[str]) -> None:
    """`text.weights` as a folder must hold the subfolders of the encoders it is to provide."""
    if not folder.is_dir():
        return  # a single file: the loader names what is missing in it
    missing = [
        TEXT_ENCODER_SUBFOLDERS[name] for name in names
        if not (folder / TEXT_ENCODER_SUBFOLDERS[name] / "config.json").is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"text.weights={str(folder)!r} must be a diffusers SD3 pipeline folder; missing "
            + ", ".join(f"{sub}/config.json" for sub in missing)
        )


def _check_loaded_sizes(
    cfg: TextConfig, encoders: dict[str, nn.Module], sources: dict[str, Path], num_t5_tokens: int
) -> None:
    """Loaded encoders (`sources`: name -> where from) must have the sizes the config promises (the
    MM-DiT is built from them) and a T5 embedding table that covers every id of the T5 tokenizer."""
    expected = {
        "clip_l": {"hidden_size": cfg.clip_l.hidden_size, "num_hidden_layers": cfg.clip_l.num_layers,
                   "projection_dim": cfg.clip_l.projection_dim},
        "clip_g": {"hidden_size": cfg.clip_g.hidden_size, "num_hidden_layers": cfg.clip_g.num_layers,
                   "projection_dim": cfg.clip_g.projection_dim},
        "t5": {"d_model": cfg.t5.d_model, "num_layers": cfg.t5.num_layers},
    }
    problems = [
        f"{name}.{key}: config {value}, {sources[name]} has {getattr(encoders[name].config, key)}"
        for name in sources
        for key, value in expected[name].items()
        if getattr(encoders[name].config, key) != value
    ]
    if "t5" in sources and encoders["t5"].config.vocab_size < num_t5_tokens:
        problems.append(
            f"t5: the tokenizer ({cfg.t5_tokenizer}) has {num_t5_tokens} tokens, more than the "
            f"{encoders['t5'].config.vocab_size} embedding rows in {sources['t5']}"
        )
    if problems:
        raise ValueError("text encoder weights do not match the text config:\n  " + "\n  ".join(problems))


def text_encoders_from_config(
    cfg: TextConfig, names, dtype: torch.dtype = torch.float32, repo_root: Path | None = None
) -> dict[str, nn.Module]:
    """The encoders `names` (of clip_l, clip_g, t5) as `text_conditioner_from_config` builds them:
    each from its `cfg.<name>_weights`, else `cfg.weights`, else randomly initialised from `cfg.init_seed`."""
    # T5's embedding rows follow its tokenizer; the CLIP encoders need no tokenizer.
    num_t5_tokens = len(config_tokenizers(cfg, repo_root)[1]) if "t5" in names else 0
    return _encoders(cfg, names, dtype, repo_root, num_t5_tokens)


def _encoders(cfg: TextConfig, names, dtype: torch.dtype, repo_root: Path | None, num_t5_tokens: int) -> dict:
    sources = {name: resolve_config_path(path, repo_root) for name, path in weight_sources(cfg).items()
               if name in names}
    if cfg.weights:
        from_pipeline = [name for name in sources if not getattr(cfg, f"{name}_weights")]
        _check_pipeline_folder(resolve_config_path(cfg.weights, repo_root), from_pipeline)
    encoders = {
        name: load_text_encoder(sources[name], name, dtype) if name in sources
        else random_encoder(cfg, name, num_t5_tokens).to(dtype)
        for name in names
    }
    _check_loaded_sizes(cfg, encoders, sources, num_t5_tokens)
    return encoders


def text_conditioner_from_config(
    cfg: TextConfig, dtype: torch.dtype = torch.float32, repo_root: Path | None = None,
    encoders: dict[str, nn.Module] | None = None,
) -> TextConditioner:
    """Tokenizers from the config's folders (relative to `repo_root`, default the repository root);
    each encoder from its `cfg.<name>_weights`, else from `cfg.weights` (a diffusers SD3 pipeline
    folder or a single file with `text_encoders.*`), else randomly initialised from `cfg.init_seed`.
    Weights load in any layout `encoder_files.load_text_encoder` reads (OpenCLIP bigG too).
    `encoders`: ones built already (adapted CLIP encoders), used as they are."""
    clip_tokenizer, t5_tokenizer = config_tokenizers(cfg, repo_root)
    given = dict(encoders or {})
    if not given and not weight_sources(cfg):
        return TextConditioner.from_config(cfg, clip_tokenizer, t5_tokenizer, dtype)
    built = _encoders(cfg, [name for name in ENCODER_NAMES if name not in given], dtype, repo_root, len(t5_tokenizer))
    built.update(given)
    conditioner = TextConditioner(built["clip_l"], built["clip_g"], built["t5"],
                                  prompt_tokenizers(cfg, clip_tokenizer, t5_tokenizer), configured_dropout(cfg))
    if given:
        from sd3train.model.adapters import train_adapters_only

        for encoder in given.values():  # the conditioner froze them whole: their adapters train
            train_adapters_only(encoder)
    return conditioner
