"""The adapter section of the training config (`adapter=lora|dora|loha|lokr`): LoRA-family adapters
trained on a frozen base (sd3train/model/adapters.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# adapter.kind: none (every MM-DiT weight trains), or a peft adapter (sd3train/model/adapters.py).
ADAPTER_KINDS = ("none", "lora", "dora", "loha", "lokr")
# adapter.init for lora / dora: peft's initialisations that need no data or calibration pass.
LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")
# adapter.text_encoders: the text encoders that may carry adapters too (T5 stays frozen: its outputs
# can come from the precompute cache, and at 4.7B parameters it is not what LoRA recipes adapt).
TEXT_ADAPTER_ENCODERS = ("clip_l", "clip_g")


@dataclass
class AdapterConfig:
    """LoRA-family adapters on the MM-DiT (`adapter=lora|dora|loha|lokr`), and optionally on the CLIP
    text encoders (`text_encoders`): the base weights (model.weights, text.*weights) stay frozen in
    the training dtype; only the adapters train, average (EMA) and are checkpointed."""

    kind: str = "none"
    rank: int = 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input (LoRA) or of whole modules (LoHa, LoKr)
    # Named groups (attention, mlp, modulation, context_stream) or regular expressions over module names.
    targets: list[str] = field(default_factory=lambda: ["attention"])
    blocks: Optional[list[int]] = None  # joint blocks to adapt; None: all
    init: str = "default"  # one of LORA_INITS (lora, dora); loha and lokr take default only
    # CLIP text encoders adapted too (subset of TEXT_ADAPTER_ENCODERS), on their attention projections,
    # with this kind, rank and alpha; they then run with gradients in the training step (live even
    # with data.cached=true, from the cached captions; T5 and any unadapted CLIP still from the cache).
    text_encoders: list[str] = field(default_factory=list)
