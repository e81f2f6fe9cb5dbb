"""The text encoders of a run that trains on the precompute cache: only preview and evaluation
prompts need them, so they are built on the CPU when first needed and never reach the training
device (at real size, T5-XXL alone is 19 GB in fp32).

    text = CPUTextConditioner(cfg.text)
    keep = text.dropout_keep_mask(batch_size, generator)   # what training needs: no encoder built
    context, pooled = text.encode(prompts)                 # builds the encoders (CPU, fp32) once
"""

from __future__ import annotations

from typing import Optional

import torch

from sd3train.checkpoint.components import text_conditioner_from_config
from sd3train.config.schema import TextConfig
from sd3train.model.text_encoders import TextConditioner, configured_dropout, sample_keep_mask


class CPUTextConditioner:
    """Stands in for `TextConditioner` in a module that trains on cached encoder outputs."""

    def __init__(self, cfg: TextConfig):
        self.cfg = cfg
        self.dropout = configured_dropout(cfg)
        self._conditioner: Optional[TextConditioner] = None

    def conditioner(self) -> TextConditioner:
        if self._conditioner is None:
            self._conditioner = text_conditioner_from_config(self.cfg)
        return self._conditioner

    def dropout_keep_mask(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(B, 3) bool keeps, as `TextConditioner.dropout_keep_mask` draws them."""
        return sample_keep_mask(batch_size, self.dropout, generator)

    def encode(self, prompts: list[str], without: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) on the CPU, without dropout (and without the encoders `without` names)."""
        return self.conditioner().encode(prompts, without)

    def eval(self) -> "CPUTextConditioner":
        return self
