"""Compose-time checks of `adapter.text_encoders` (LoRA on the CLIP-L and bigG text encoders)."""

from __future__ import annotations

from sd3train.config.adapter_schema import TEXT_ADAPTER_ENCODERS
from sd3train.config.schema import TrainConfig


def text_adapter_problems(cfg: TrainConfig) -> list[str]:
    """One line per problem with `adapter.text_encoders` (the rest of `adapter` is checked beside it).

    With data.cached=true the adapted encoders run live on the cached captions while T5 (and an
    unadapted CLIP) are still read from the cache (sd3train/lit/text_adapters.py): nothing to refuse.
    """
    names = list(cfg.adapter.text_encoders)
    if not names:
        return []
    problems = []
    unknown = [name for name in names if name not in TEXT_ADAPTER_ENCODERS]
    if unknown:
        problems.append(f"adapter.text_encoders: {unknown} are not among {list(TEXT_ADAPTER_ENCODERS)} (T5 takes no "
                        "adapter: its outputs stay frozen, and on data.cached=true are read from the cache)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(f"adapter.text_encoders: {repeated} named more than once")
    if cfg.adapter.kind == "none":
        problems.append("adapter.text_encoders: set, but adapter.kind is none; choose adapter=lora (or dora, loha, "
                        "lokr): the text encoders take the MM-DiT adapter's kind, rank and alpha")
    return problems
