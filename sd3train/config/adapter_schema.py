"""The adapter section of the training config (`adapter=lora|dora|loha|lokr`): LoRA-family adapters
trained on a frozen base (sd3train/model/adapters.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# adapter.kind: none (every MM-DiT weight trains), or a peft adapter (sd3train/model/adapters.py).
ADAPTER_KINDS = ("none", "lora", "dora", "loha", "lokr")
# adapter.init for lora / dora: peft's initialisations that need no data or calibration pass.
LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")


@dataclass
class AdapterConfig:
    """LoRA-family adapters on the MM-DiT (`adapter=lora|dora|loha|lokr`): the base weights
    (model.weights) stay frozen in the training dtype; only the adapters train, average (EMA) and
    are checkpointed."""

    kind: str = "none"
    rank: int = 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input (LoRA) or of whole modules (LoHa, LoKr)
    # Named groups (attention, mlp, modulation, context_stream) or regular expressions over module names.
    targets: list[str] = field(default_factory=lambda: ["attention"])
    blocks: Optional[list[int]] = None  # joint blocks to adapt; None: all
    init: str = "default"  # one of LORA_INITS (lora, dora); loha and lokr take default only
