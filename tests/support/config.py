"""The shipped config, composed for tests as sd3train-train composes it.

    cfg = compose_config("experiment=tiny_cpu", "trainer.max_steps=20")   # a validated TrainConfig
    cfg = tiny_config(shapes, tmp_path, "model.depth=1")                  # tiny_cpu on test shards
"""

from __future__ import annotations

from pathlib import Path

from sd3train.config import compose
from sd3train.config.schema import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def compose_config(*overrides: str) -> TrainConfig:
    """conf/config.yaml with `overrides`, validated: ConfigError lists every problem."""
    return compose.compose_config(overrides)


def tiny_config(shapes: Path, runs_dir: Path, *overrides: str) -> TrainConfig:
    """The tiny_cpu experiment on the shards `build_shapes` wrote to `shapes`, running in `runs_dir`,
    without DataLoader workers, and with the EMA updated every step (so a run of a few steps moves
    it). A shard override replaces the default one: sd3train-train joins repeated shard overrides
    into one list (what a shell's brace expansion gives)."""
    shards = {"data.shards": f"'{shapes}/train-{{000000..000003}}.tar'", "data.val_shards": f"'{shapes}/val-000000.tar'",
              "ema.every_n_steps": "1"}
    given = {override.split("=", 1)[0].lstrip("+") for override in overrides}
    defaults = [f"{key}={value}" for key, value in shards.items() if key not in given]
    return compose_config("experiment=tiny_cpu", *defaults, f"paths.runs_dir={runs_dir}", "data.num_workers=0",
                          *overrides)


def adapter_run_config(shapes: Path, root: Path, base: Path, adapter: list[str], *overrides: str) -> TrainConfig:
    """A tiny 2-block adapter run (`adapter` overrides) on the base checkpoint `base`, writing under
    `root`/runs: batch 4, lr 1e-2, a checkpoint every 2 steps, nothing sampled, metrics every step."""
    return tiny_config(shapes, root / "runs", "model.depth=2", f"model.weights={base}", *adapter,
                       "data.batch_size=4", "data.val_shards=null", "eval.prompts=[]", "eval.samples_per_caption=0",
                       "logger.wandb=false", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
                       "trainer.checkpoint_every_n_steps=2", "optim.lr=1e-2", *overrides)
