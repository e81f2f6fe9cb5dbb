"""The README's curation flow on one machine, each tool as a console script: shards -> sd3train-dedup
(thumbnail descriptor) -> sd3train-caption (a tiny random VLM) -> sd3train-precompute (with the
caption tables) -> sd3train-train on the cache with the blocklist, for one full epoch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from sd3train.data.datamodule import ShardDataModule
from sd3train.data.skips import load_blocklist
from tests.support.config import compose_config
from tests.support.datamodules import one_epoch_keys
from tests.support.dedup_shards import write_planted_shards
from tests.support.tiny_vlm import save_tiny_vlm

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def run(tool: str, *args: str, cwd: Path) -> str:
    result = subprocess.run([str(BIN / tool), *args], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, f"{tool}: {(result.stdout + result.stderr)[-4000:]}"
    return result.stdout + result.stderr


def test_dedup_caption_precompute_then_train_on_the_cache_without_the_duplicates(tmp_path):
    planted = write_planted_shards(tmp_path / "src", originals=72, copies=8, per_shard=20, triples=1)
    spec = planted.spec  # 4 shards of 20

    run("sd3train-dedup", "all", "--out", "dedup", "--shards", spec, "--descriptor", "thumbnail", "--clusters", "4",
        cwd=tmp_path)
    blocklist = sorted(load_blocklist(tmp_path / "dedup" / "blocklist.txt"))
    assert blocklist == sorted(key for group in planted.groups for key in group[1:])  # smallest key kept

    save_tiny_vlm(tmp_path / "vlm")
    run("sd3train-caption", "--shards", spec, "--model", "vlm", "--out", "captions", "--device", "cpu",
        "--dtype", "fp32", "--max-new-tokens", "12", cwd=tmp_path)
    tables = sorted((tmp_path / "captions").glob("*.jsonl"))
    assert len(tables) == 4 and sum(len(path.read_text().splitlines()) for path in tables) == 80

    shards = f"{tmp_path}/cache/planted-{{000000..000003}}.tar"
    run("sd3train-precompute", "--out", "cache", "--batch-size", "8", "experiment=tiny_cpu", f"data.shards={spec}",
        f"data.synthetic_captions={tmp_path / 'captions'}", cwd=tmp_path)
    run("sd3train-train", "experiment=tiny_cpu", "data=cached", f"data.shards={shards}",
        f"data.blocklist={tmp_path / 'dedup' / 'blocklist.txt'}", f"data.synthetic_captions={tmp_path / 'captions'}",
        "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=10", "trainer.max_steps=12",
        "trainer.log_every_n_steps=1", "trainer.accelerator=cpu", "model.depth=1", "eval.prompts=[]",
        "eval.samples_per_caption=0", "logger.wandb=false", "trainer.progress_bar=false",
        f"paths.runs_dir={tmp_path / 'runs'}", cwd=tmp_path)
    with (tmp_path / "runs" / "tiny_cpu" / "main" / "metrics.csv").open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("data/samples_read")]
    last = rows[-1]
    # A full epoch was read (80 samples, 8 blocklisted and never batched) and training went into the next.
    assert float(last["data/epoch"]) >= 1 and float(last["data/skipped_blocklisted"]) >= len(blocklist)
    info = json.loads((tmp_path / "cache" / "cache_info.json").read_text())
    assert "synthetic_captions" in json.dumps(info)

    # The same cached data, one full epoch in process: no blocklisted key, every other key once.
    cfg = compose_config("experiment=tiny_cpu", "data=cached", f"data.shards='{shards}'", "data.batch_size=8",
                         f"data.blocklist={tmp_path / 'dedup' / 'blocklist.txt'}", "data.num_workers=0",
                         f"data.synthetic_captions={tmp_path / 'captions'}", "data.shuffle_buffer=10")
    keys, _ = one_epoch_keys(ShardDataModule(cfg.data, seed=cfg.trainer.seed))
    assert not set(keys) & set(blocklist)
    assert Counter(keys) == Counter(key for key in planted.keys if key not in set(blocklist))
