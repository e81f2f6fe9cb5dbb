"""Helpers shared by tests (tests/ is on sys.path through pytest's `pythonpath`)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from sd3train.config.validate import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(shapes: Path, runs_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        raw = compose(config_name="config", overrides=[
            "experiment=tiny_cpu",
            f"data.train_shards='{shapes}/train-{{000000..000003}}.tar'",
            f"data.val_shards='{shapes}/val-000000.tar'",
            f"paths.runs_dir={runs_dir}",
            "data.num_workers=0",
            *overrides,
        ])
    return load_config(raw)
