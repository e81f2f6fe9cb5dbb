"""The README commands as a user types them: train a few steps, then sample from the checkpoint."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The console scripts sit next to the interpreter running the tests (make calls .venv/bin/python).
BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained_run(repo_shapes, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("user")
    run([str(BIN / "sd3train-train"), "experiment=tiny_cpu", "trainer.max_steps=20", "model.depth=2",
         "data.batch_size=4"], cwd)
    return cwd / "runs" / "tiny_cpu" / "main"


def test_run_directory_has_everything(trained_run):
    assert (trained_run / "config.yaml").is_file()
    checkpoints = trained_run / "checkpoints"
    # 20 steps, checkpoint_every_n_steps=500: only the final step is saved, as a published step directory.
    assert os.readlink(checkpoints / "last") == "step-0000020"
    assert {path.name for path in (checkpoints / "step-0000020").iterdir()} == {"checkpoint.ckpt", "config.yaml", "COMPLETE"}
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last", "step-0000020"]
    samples = trained_run / "samples" / "step-20"
    records = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for record in records:
        assert set(record) == {"prompt", "seed", "file"}
        assert (samples / record["file"]).is_file()  # paths are relative to the samples folder
    # The end-of-run evaluation's 108 samples (36 captions x 3), 12 to a row of 64 px images.
    with Image.open(trained_run / "samples" / "eval-step-20.png") as grid:
        assert grid.size == (12 * 64, 9 * 64)


def test_metrics_csv_has_the_documented_metrics(trained_run):
    with open(trained_run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    expected = {"train/loss", "train/grad_norm", "train/lr", "train/samples_per_sec", "val/loss",
                "eval/colour_adherence", "eval/shape_adherence", "data/wait_fraction", "data/samples_read",
                "data/skipped_fraction", "data/skipped_decode_error"} | {f"train/loss_bin_{i}" for i in range(10)}
    assert expected <= columns, expected - columns
    waits = [float(row["data/wait_fraction"]) for row in rows if row["data/wait_fraction"]]
    assert waits and all(0.0 <= wait <= 1.0 for wait in waits)
    # 20 steps of batch 4 from clean shards: 80 samples trained, at least that many read, none skipped.
    read = [float(row["data/samples_read"]) for row in rows if row["data/samples_read"]]
    assert read[-1] >= 76 and all(float(row["data/skipped_fraction"]) == 0 for row in rows if row["data/skipped_fraction"])
    for name in ("eval/colour_adherence", "eval/shape_adherence"):
        adherence = [float(row[name]) for row in rows if row[name]]
        assert len(adherence) == 1 and 0.0 <= adherence[0] <= 1.0


def test_wandb_offline_run_has_sample_images(trained_run):
    runs = list((trained_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].glob("files/media/images/samples_*.png"))
    assert images, "no sample images logged to W&B"


def test_sample_cli_writes_pngs_and_manifest(trained_run, tmp_path):
    out = tmp_path / "samples"
    run([str(BIN / "sd3train-sample"), f"checkpoint={trained_run / 'checkpoints' / 'last'}",
         "prompts=[a red circle on a white background,a blue square on a black background]",
         "seeds=[5,6]", "num_steps=4", f"out={out}"], tmp_path)
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [5, 6]
    assert records[0]["prompt"] == "a red circle on a white background"
    assert all((out / r["file"]).is_file() for r in records)


@pytest.mark.slow  # about 20 s; the guidance itself is checked against diffusers in the unit tests
def test_sample_cli_applies_skip_layer_guidance_and_checks_it(trained_run, tmp_path):
    checkpoint = f"checkpoint={trained_run / 'checkpoints' / 'step-0000020'}"
    common = ["prompts=[a red circle on a white background]", "seeds=[5]", "num_steps=4"]
    outs = {}
    for name, extra in (("plain", []), ("guided", ["skip_layers=[0]", "skip_layer_scale=3.0", "skip_layer_stop=0.9"])):
        outs[name] = tmp_path / name
        run([str(BIN / "sd3train-sample"), checkpoint, *common, *extra, f"out={outs[name]}"], tmp_path)
    plain, guided = (np.asarray(Image.open(outs[name] / "0000-seed5.png")) for name in ("plain", "guided"))
    assert plain.shape == guided.shape and not np.array_equal(plain, guided)
    result = subprocess.run([str(BIN / "sd3train-sample"), checkpoint, *common, "skip_layers=[9]",
                             "skip_layer_scale=2.5"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "skip_layers: [9] outside the model's joint blocks 0..1" in result.stderr
