"""Lightning strategy from `StrategyConfig` (placeholder until the ZeRO strategies land: DDP only)."""

from __future__ import annotations

from sd3train.config.schema import TrainConfig


def build_strategy(cfg: TrainConfig):
    if cfg.strategy.name != "ddp":
        raise NotImplementedError("ZeRO strategies are being added")
    return "auto"
