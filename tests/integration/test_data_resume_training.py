"""Through Lightning: a run stopped at a checkpoint and resumed trains on exactly the samples the
uninterrupted run trains on next (Lightning prefetches a batch ahead; the data state must not count it)."""

from __future__ import annotations

import lightning as L
import pytest

from sd3train.train import fit
from tests.support.config import tiny_config
from tests.support.photo_shards import write_photo_shards


class RecordKeys(L.Callback):
    def __init__(self):
        self.steps: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps[trainer.global_step + 1] = list(batch["keys"])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    return write_photo_shards(tmp_path_factory.mktemp("photos"), 96, 12)


def _run(photos: str, runs_dir, max_steps: int, *overrides: str) -> dict[int, list[str]]:
    cfg = tiny_config(
        runs_dir, runs_dir, f"data.shards='{photos}'", "data.val_shards=null", "data.aspect_buckets=true",
        "data.num_workers=2", "data.batch_size=4", "data.shuffle_buffer=20", "data.synthetic_caption_key=syn.txt",
        "data.cache_latents=false", "model.depth=1", f"trainer.max_steps={max_steps}", "trainer.checkpoint_every_n_steps=5",
        "trainer.progress_bar=false", "eval.prompts=[]", "eval.samples_per_caption=0", "logger.wandb=false",
        "trainer.log_every_n_steps=1", *overrides,
    )
    recorder = RecordKeys()
    fit(cfg, extra_callbacks=(recorder,))
    return recorder.steps


def test_resumed_run_trains_on_the_same_samples_as_an_uninterrupted_one(photos, tmp_path):
    straight = _run(photos, tmp_path / "straight", 30)
    first = _run(photos, tmp_path / "resumed", 5)
    second = _run(photos, tmp_path / "resumed", 30)  # trainer.resume=auto finds step 5
    assert sorted(first) == list(range(1, 6)) and sorted(second) == list(range(6, 31))
    assert {**first, **second} == straight
