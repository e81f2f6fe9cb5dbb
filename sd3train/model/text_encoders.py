"""SD3 text conditioning: CLIP-L + OpenCLIP bigG + T5 -> (context, pooled), with per-encoder dropout.

Layout (SD3 paper; diffusers' `StableDiffusion3Pipeline.encode_prompt`):
  context = cat_seq(pad_channels(cat_ch(clip_l_hidden, clip_g_hidden), to T5 width), t5_hidden)
            (B, Lc + Lt, Dt), e.g. (B, 77 + 77, 4096)
  pooled  = cat(clip_l_pooled, clip_g_pooled)  (B, Pl + Pg), e.g. (B, 768 + 1280)
CLIP hidden states are the penultimate layer's (no final layer norm); pooled vectors are the
projected end-token states; T5 gives its last hidden state. No attention masks, as in SD3.

Training drops each encoder independently (p = 0.464 each): its slice of the context and its
pooled part become exact zeros.

    from sd3train.checkpoint.components import text_conditioner_from_config
    conditioner = text_conditioner_from_config(text_cfg)       # frozen, eval mode; weights the config names
    conditioner = TextConditioner.from_config(text_cfg, clip_tokenizer, t5_tokenizer)   # random init only
    context, pooled = conditioner.encode(["a red circle on a white background"])
    context, pooled = conditioner(prompts, generator=torch.Generator().manual_seed(step))  # dropout
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)

from sd3train.config.schema import TEXT_ENCODER_NAMES, CLIPEncoderConfig, T5EncoderConfig, TextConfig
from sd3train.model.tokenizers import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, PromptTokenizer
from sd3train.runtime.rng import derive_seed

ENCODER_NAMES = TEXT_ENCODER_NAMES  # ("clip_l", "clip_g", "t5"): the order of the columns of a keep mask
# Real CLIP checkpoints have 77 positions; the table stays that size when prompts are shorter.
CLIP_MAX_POSITIONS = 77
_T5_VOCAB_MULTIPLE = 128  # T5 rounds its embedding rows up (32,100 tokens -> 32,128 rows)


def clip_text_config(cfg: CLIPEncoderConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.projection_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=CLIP_MAX_POSITIONS,
        hidden_act=cfg.hidden_act,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,  # pooling takes the first end token, so "!" padding is fine
    )


def t5_encoder_config(cfg: T5EncoderConfig, num_tokens: int) -> T5Config:
    vocab_size = -(-num_tokens // _T5_VOCAB_MULTIPLE) * _T5_VOCAB_MULTIPLE
    return T5Config(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        feed_forward_proj=cfg.feed_forward_proj,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )


def _encoder_seed(init_seed: int, name: str) -> int:
    """An independent seed per encoder, so resizing one encoder leaves the others' weights alone."""
    return derive_seed("sd3train-text", init_seed, name)


def _random_init(model_class: type[nn.Module], config, seed: int) -> nn.Module:
    # A forked CPU RNG: the caller's global random state is untouched, and the weights depend on
    # the seed alone (bit-identical in any process).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def random_encoder(cfg: TextConfig, name: str, num_t5_tokens: int) -> nn.Module:
    """The `name` encoder ("clip_l", "clip_g" or "t5") `cfg` describes, randomly initialised from
    `cfg.init_seed`; `num_t5_tokens` (the T5 tokenizer's size) sets T5's embedding rows."""
    seed = _encoder_seed(cfg.init_seed, name)
    if name == "t5":
        return _random_init(T5EncoderModel, t5_encoder_config(cfg.t5, num_t5_tokens), seed)
    return _random_init(CLIPTextModelWithProjection, clip_text_config(getattr(cfg, name)), seed)


def prompt_tokenizers(
    cfg: TextConfig, clip_tokenizer: PreTrainedTokenizerBase, t5_tokenizer: PreTrainedTokenizerBase
) -> dict[str, PromptTokenizer]:
    """Each encoder's `PromptTokenizer`: the lengths and CLIP padding `cfg` asks for."""
    return {
        "clip_l": PromptTokenizer.clip(clip_tokenizer, cfg.clip_l.max_length, cfg.clip_l.pad_with_end),
        "clip_g": PromptTokenizer.clip(clip_tokenizer, cfg.clip_g.max_length, cfg.clip_g.pad_with_end),
        "t5": PromptTokenizer.t5(t5_tokenizer, cfg.t5.max_length),
    }


def configured_dropout(cfg: TextConfig) -> tuple[float, float, float]:
    """The per-encoder dropout probabilities, in `ENCODER_NAMES` order."""
    return cfg.dropout_clip_l, cfg.dropout_clip_g, cfg.dropout_t5


def sample_keep_mask(
    batch_size: int, dropout: tuple[float, float, float], generator: torch.Generator
) -> torch.Tensor:
    """(B, 3) bool, column k True with probability 1 - dropout[k], drawn on the generator's device."""
    draws = torch.rand((batch_size, len(dropout)), generator=generator, device=generator.device)
    # The thresholds as Python numbers (each the float32 1 - p): a tensor of them would be a host copy.
    keep_probability = [float(np.float32(1.0) - np.float32(p)) for p in dropout]
    return torch.stack([draws[:, k] < keep for k, keep in enumerate(keep_probability)], dim=1)  # (B, 3)


def removal_keep_mask(batch_size: int, removed: tuple[str, ...]) -> torch.Tensor | None:
    """(B, 3) bool keeps with the encoders `removed` (names of ENCODER_NAMES) False everywhere:
    sampling without them, as SD3 drops T5 at inference (its context part zeros). None when none is."""
    unknown = [name for name in removed if name not in ENCODER_NAMES]
    if unknown:
        raise ValueError(f"unknown text encoder(s) {unknown}; expected some of {ENCODER_NAMES}")
    if not removed:
        return None
    keep = torch.ones(batch_size, len(ENCODER_NAMES), dtype=torch.bool)
    for name in removed:
        keep[:, ENCODER_NAMES.index(name)] = False
    return keep


def encoder_outputs(name: str, encoder: nn.Module, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One encoder's part of `TextConditioner.encode_tokens`, under the caller's grad mode (adapted
    CLIP encoders train through it): `{name}_hidden` and, for CLIP, `{name}_pooled`."""
    if name == "t5":
        return {"t5_hidden": encoder(input_ids=token_ids).last_hidden_state}  # (B, Lt, Dt)
    output = encoder(input_ids=token_ids, output_hidden_states=True)
    # (B, Lc, D) the penultimate layer's states; (B, P) the projected end-token state.
    return {f"{name}_hidden": output.hidden_states[-2], f"{name}_pooled": output.text_embeds}


def _zero_dropped(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows of `tensor` where keep is False become exact zeros; kept rows are returned unchanged."""
    keep = keep.view(-1, *([1] * (tensor.dim() - 1)))  # (B, 1, ...)
    return torch.where(keep, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


class TextConditioner(nn.Module):
    """Frozen CLIP-L, bigG and T5 encoders with their tokenizers; prompts -> (context, pooled)."""

    def __init__(
        self,
        clip_l: CLIPTextModelWithProjection,
        clip_g: CLIPTextModelWithProjection,
        t5: T5EncoderModel,
        tokenizers: dict[str, PromptTokenizer],
        dropout: tuple[float, float, float] = (0.464, 0.464, 0.464),
    ):
        super().__init__()
        problems = []
        if tokenizers["clip_l"].max_length != tokenizers["clip_g"].max_length:
            problems.append(
                f"CLIP-L and bigG max_length differ ({tokenizers['clip_l'].max_length} vs "
                f"{tokenizers['clip_g'].max_length}); their hidden states are concatenated on channels"
            )
        for name in ("clip_l", "clip_g"):
            if tokenizers[name].max_length > CLIP_MAX_POSITIONS:
                problems.append(f"{name}.max_length {tokenizers[name].max_length} > {CLIP_MAX_POSITIONS} positions")
        clip_width = clip_l.config.hidden_size + clip_g.config.hidden_size
        if clip_width > t5.config.d_model:
            problems.append(
                f"CLIP-L + bigG width {clip_width} exceeds the T5 width {t5.config.d_model}: "
                "the CLIP context is zero-padded up to the T5 width, never cut"
            )
        if any(not 0.0 <= p <= 1.0 for p in dropout):
            problems.append(f"dropout probabilities must lie in [0, 1], got {tuple(dropout)}")
        if problems:
            raise ValueError("invalid text conditioner:\n  " + "\n  ".join(problems))
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizers = dict(tokenizers)
        self.dropout = tuple(float(p) for p in dropout)
        for encoder in self.encoders():
            encoder.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_config(
        cls,
        cfg: TextConfig,
        clip_tokenizer: PreTrainedTokenizerBase,
        t5_tokenizer: PreTrainedTokenizerBase,
        dtype: torch.dtype = torch.float32,
    ) -> "TextConditioner":
        """The encoders `cfg` describes, randomly initialised from `cfg.init_seed` (the same seed gives
        the same weights in any process), with the given tokenizers. `cfg.*weights` are not read:
        `sd3train.checkpoint.components.text_conditioner_from_config` loads them."""
        tokenizers = prompt_tokenizers(cfg, clip_tokenizer, t5_tokenizer)
        encoders = [random_encoder(cfg, name, len(t5_tokenizer)).to(dtype) for name in ENCODER_NAMES]
        return cls(*encoders, tokenizers, configured_dropout(cfg))

    def encoders(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.clip_l, self.clip_g, self.t5

    def train(self, mode: bool = True) -> "TextConditioner":
        # The encoders are frozen: they stay in eval mode whatever the parent module does.
        super().train(mode)
        for encoder in self.encoders():
            encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.t5.shared.weight.device

    @property
    def context_dim(self) -> int:
        return self.t5.config.d_model

    @property
    def pooled_dim(self) -> int:
        return self.clip_l.config.projection_dim + self.clip_g.config.projection_dim

    @property
    def context_length(self) -> int:
        return self.tokenizers["clip_l"].max_length + self.tokenizers["t5"].max_length

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids per encoder: {"clip_l": (B, Lc), "clip_g": (B, Lc), "t5": (B, Lt)} on CPU."""
        return {name: self.tokenizers[name](prompts) for name in ENCODER_NAMES}

    @torch.no_grad()
    def encode_tokens(self, token_ids: dict[str, torch.Tensor],
                      names: tuple[str, ...] = ENCODER_NAMES) -> dict[str, torch.Tensor]:
        """Per-encoder outputs from token ids (see `encode_per_encoder`), of the encoders `names`."""
        outputs = {}
        for name in names:
            outputs.update(encoder_outputs(name, getattr(self, name), token_ids[name].to(self.device)))
        return outputs

    def encode_per_encoder(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"clip_l_hidden", "clip_l_pooled", "clip_g_hidden", "clip_g_pooled", "t5_hidden"}: what a
        precompute step caches; `assemble` turns it into (context, pooled)."""
        return self.encode_tokens(self.tokenize(prompts))

    @staticmethod
    def assemble(
        outputs: dict[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-encoder outputs -> (context (B, Lc + Lt, Dt), pooled (B, Pl + Pg)).

        `keep` (B, 3) bool, columns (clip_l, clip_g, t5): a False zeroes that encoder's slice of
        the context (its channels of the CLIP part, or the whole T5 part) and its pooled part.
        """
        clip_l, clip_g, t5 = outputs["clip_l_hidden"], outputs["clip_g_hidden"], outputs["t5_hidden"]
        pooled_l, pooled_g = outputs["clip_l_pooled"], outputs["clip_g_pooled"]
        clip_width, context_dim = clip_l.shape[-1] + clip_g.shape[-1], t5.shape[-1]
        if clip_width > context_dim:
            raise ValueError(f"CLIP-L + bigG width {clip_width} exceeds the T5 width {context_dim}")
        if keep is not None:
            if keep.shape != (t5.shape[0], len(ENCODER_NAMES)):
                raise ValueError(f"keep must have shape ({t5.shape[0]}, 3), got {tuple(keep.shape)}")
            keep = keep.to(device=t5.device, dtype=torch.bool)
            clip_l, pooled_l = _zero_dropped(clip_l, keep[:, 0]), _zero_dropped(pooled_l, keep[:, 0])
            clip_g, pooled_g = _zero_dropped(clip_g, keep[:, 1]), _zero_dropped(pooled_g, keep[:, 1])
            t5 = _zero_dropped(t5, keep[:, 2])
        clip = torch.cat([clip_l, clip_g], dim=-1)  # (B, Lc, Dl + Dg)
        clip = F.pad(clip, (0, context_dim - clip_width))  # (B, Lc, Dt)
        context = torch.cat([clip, t5], dim=-2)  # (B, Lc + Lt, Dt)
        pooled = torch.cat([pooled_l, pooled_g], dim=-1)  # (B, Pl + Pg)
        return context, pooled

    def dropout_keep_mask(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """(B, 3) bool: independent Bernoulli keeps with probabilities 1 - dropout_{clip_l, clip_g, t5}."""
        keep = sample_keep_mask(batch_size, self.dropout, generator)
        return keep if device is None else keep.to(device)

    def encode(self, prompts: list[str], without: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) without dropout: sampling and evaluation; the encoders `without` names
        removed (`removal_keep_mask`)."""
        return self.assemble(self.encode_per_encoder(prompts), removal_keep_mask(len(prompts), tuple(without)))

    def forward(
        self, prompts: list[str], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled); with a generator, each encoder is dropped per sample (training)."""
        outputs = self.encode_per_encoder(prompts)
        keep = None if generator is None else self.dropout_keep_mask(len(prompts), generator)
        return self.assemble(outputs, keep)
