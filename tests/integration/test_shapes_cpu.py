"""The embedded default `make train` runs: shapes_cpu on a precompute cache made as the Makefile
makes it, end to end (compile off to keep it short; bf16 autocast and the math attention on)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from sd3train.curation.precompute import main as precompute
from sd3train.tools.make_shapes import build_shapes
from sd3train.train import fit
from tests.support.config import compose_config

TRAIN = "train-{000000..000003}.tar"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes_cpu")
    build_shapes(root / "shapes", train=64, val=8, samples_per_shard=16)
    for shards in (TRAIN, "val-000000.tar"):  # the Makefile's `data` target, on smaller shards
        assert precompute(["--out", str(root / "cache"), "experiment=shapes_cpu", "data.cached=false",
                           f"data.shards='{root}/shapes/{shards}'"]) == 0
    return root


def test_shapes_cpu_trains_and_evaluates_on_the_cache(cache):
    cfg = compose_config(
        "experiment=shapes_cpu", f"data.shards='{cache}/cache/{TRAIN}'",
        f"data.val_shards='{cache}/cache/val-000000.tar'", f"paths.runs_dir={cache / 'runs'}",
        "model.compile=false", "trainer.max_steps=4", "trainer.val_every_n_steps=4", "eval.samples_per_caption=1",
        "eval.sample_every_n_steps=0", "ema.every_n_steps=1", "logger.wandb=false",
    )
    assert (cfg.trainer.precision, cfg.model.attention_backend, cfg.data.cached) == ("bf16-mixed", "math", True)
    fit(cfg)
    run = cache / "runs" / "shapes_cpu" / "main"
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for name in ("val/loss", "eval/colour_adherence", "eval/shape_adherence"):
        assert [row[name] for row in rows if row[name]], name
    with Image.open(run / "samples" / "eval-step-4.png") as grid:  # 36 captions, 12 to a row
        assert grid.size == (12 * 64, 3 * 64)
