"""The precompute cache: per sample, the VAE posterior and each text encoder's outputs, in tar shards.

`sd3train-precompute` writes, for each source shard, a cache shard of the same name with the
same keys. Per sample:
    <key>.latent.safetensors   {"mean", "std"}: (C, h, w) VAE posterior at the sample's bucket
    <key>.text.safetensors     {"clip_l_hidden", "clip_l_pooled", "clip_g_hidden", "clip_g_pooled",
                                "t5_hidden"} for the original caption
    <key>.syn.safetensors      the same for the synthetic caption (when the sample has one)
    <key>.json                 {"caption", "synthetic_caption", "bucket": [h, w],
                                "original_size": [h, w], "crop_offset": [top, left]}
and the folder holds `cache_info.json` (format, dtype, the VAE/text/data settings it was made with).

Training reads it with `data.cached=true` (`data=cached`): `CachedDecoder` picks the original or
synthetic caption's outputs by (seed, key, epoch) like the image path, and the LightningModule
draws the latent from (mean, std) and applies the per-encoder dropout to the cached outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sd3train.data.cache_info import CACHE_FORMAT, CACHE_INFO_NAME, read_cache_info  # noqa: F401 (re-exported)
from sd3train.data.captions import use_synthetic
from sd3train.data.decoders import Decoded, Skip
from sd3train.data.skips import DECODE_ERROR, NO_CAPTION, NO_IMAGE
from sd3train.data.tar_reader import RawSample

LATENT_EXT = "latent.safetensors"
TEXT_EXT = "text.safetensors"
SYNTHETIC_TEXT_EXT = "syn.safetensors"
META_EXT = "json"
TEXT_OUTPUTS = ("clip_l_hidden", "clip_l_pooled", "clip_g_hidden", "clip_g_pooled", "t5_hidden")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def encode_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    """safetensors bytes of `tensors` cast to `dtype` (deterministic: same tensors, same bytes)."""
    return save_safetensors({name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in tensors.items()})


def sample_record(
    key: str,
    mean: torch.Tensor,
    std: torch.Tensor,
    text: dict[str, torch.Tensor],
    synthetic_text: Optional[dict[str, torch.Tensor]],
    meta: dict[str, Any],
    dtype: torch.dtype,
) -> dict[str, Any]:
    """One cache sample as a webdataset record ({"__key__", extension: bytes})."""
    record = {
        "__key__": key,
        LATENT_EXT: encode_tensors({"mean": mean, "std": std}, dtype),
        TEXT_EXT: encode_tensors({name: text[name] for name in TEXT_OUTPUTS}, dtype),
        META_EXT: json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    if synthetic_text is not None:
        record[SYNTHETIC_TEXT_EXT] = encode_tensors({name: synthetic_text[name] for name in TEXT_OUTPUTS}, dtype)
    return record


@dataclass(frozen=True)
class CachedDecoder:
    """Cache samples -> latent moments and text-encoder outputs, bucketed by latent shape."""

    synthetic: bool = False
    p_synthetic: float = 0.5
    seed: int = 0

    def _meta(self, raw: RawSample) -> Union[dict, Skip]:
        for extension, reason in ((LATENT_EXT, NO_IMAGE), (TEXT_EXT, NO_CAPTION), (META_EXT, NO_CAPTION)):
            if extension not in raw.fields:
                return Skip(reason, f"cache sample has no {extension} (has {sorted(raw.fields)})")
        try:
            meta = json.loads(raw.fields[META_EXT])
            return meta if isinstance(meta, dict) and "bucket" in meta else Skip(DECODE_ERROR, "json has no bucket")
        except ValueError as error:
            return Skip(DECODE_ERROR, f"unreadable json: {error}")

    def probe(self, raw: RawSample) -> Union[tuple[int, int], Skip]:
        meta = self._meta(raw)
        return meta if isinstance(meta, Skip) else tuple(meta["bucket"])

    def decode(self, raw: RawSample, epoch: int) -> Union[Decoded, Skip]:
        meta = self._meta(raw)
        if isinstance(meta, Skip):
            return meta
        synthetic = (
            self.synthetic
            and SYNTHETIC_TEXT_EXT in raw.fields
            and use_synthetic(self.seed, raw.key, epoch, self.p_synthetic)
        )
        try:
            latent = load_safetensors(raw.fields[LATENT_EXT])
            text = load_safetensors(raw.fields[SYNTHETIC_TEXT_EXT if synthetic else TEXT_EXT])
            tensors = {"latent_mean": latent["mean"], "latent_std": latent["std"]}
            tensors.update({name: text[name] for name in TEXT_OUTPUTS})
        except Exception as error:  # safetensors raises its own error types for damaged bytes
            return Skip(DECODE_ERROR, f"{type(error).__name__}: {error}")
        tensors["original_sizes"] = torch.tensor(meta.get("original_size", [0, 0]))
        tensors["crop_offsets"] = torch.tensor(meta.get("crop_offset", [0, 0]))
        caption = meta.get("synthetic_caption") if synthetic else meta.get("caption", "")
        return Decoded(
            key=raw.key,
            url=raw.url,
            bucket=tuple(meta["bucket"]),
            tensors=tensors,
            values={"captions": caption or "", "synthetic_captions": bool(synthetic), "flipped": False},
        )
