"""The metric suite end to end: a 2-rank ddp run measures FID, KID, CLIP score and the compositional
benchmark every 2 steps (random Inception and tiny OpenCLIP written to disk, nothing downloaded),
and `sd3train-eval` on the same checkpoints, in one process, gives the same numbers."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from sd3train.tools.make_shapes import build_shapes
from tests.support.eval_models import write_random_inception, write_tiny_openclip
from tests.support.processes import BIN, finish, launch

STEPS = (2, 4)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_models")
    return {"inception": write_random_inception(root / "inception.pth"), "clip": write_tiny_openclip(root / "clip")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """8 real 64 px images as one shard: the Inception runs on CPU at 299 px, about 0.3 s an image."""
    root = tmp_path_factory.mktemp("reference")
    build_shapes(root, train=1, val=8, samples_per_shard=8)
    return root / "val-000000.tar"


@pytest.fixture(scope="module")
def suite_run(repo_shapes, models, reference, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("suite_run")
    finish(launch([
        str(BIN / "sd3train-train"), "experiment=tiny_cpu", "strategy=ddp", "trainer.devices=2", "model.depth=2",
        "data.batch_size=4", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "trainer.val_every_n_steps=2",
        "data.val_batches=1", "ema.every_n_steps=1", "eval.prompts=[]", "eval.samples_per_caption=0",
        "diffusion.sampler.num_steps=3",
        "eval.suite=[fid,kid,clip_score,compositional]", "eval.every_n_steps=2", "eval.num_images=6",
        "eval.prompts_per_category=2", "eval.batch_size=4", "eval.kid_subsets=3",
        f"eval.reference_shards={reference}", f"eval.inception_weights={models['inception']}",
        f"eval.clip_model={models['clip']}",
    ], cwd), timeout=600)
    return cwd / "runs" / "tiny_cpu" / "main"


def logged_suite(run_dir: Path) -> dict[int, dict[str, float]]:
    """The eval/ metrics of metrics.csv by optimizer step (rows of step k are logged at k - 1)."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:
        values = {name: float(value) for name, value in row.items() if name.startswith("eval/") and value}
        if values:
            by_step.setdefault(int(row["step"]) + 1, {}).update(values)
    return by_step


def test_training_logs_every_metric_at_each_evaluation_step(suite_run):
    logged = logged_suite(suite_run)
    assert sorted(logged) == list(STEPS)
    categories = ["single_object", "two_object", "counting", "colours", "position", "colour_attribution", "overall"]
    expected = {"eval/fid", "eval/kid", "eval/kid_std", "eval/clip_score"} | {f"eval/compositional/{c}" for c in categories}
    for step in STEPS:
        assert set(logged[step]) == expected
        assert logged[step]["eval/fid"] > 0
        assert (suite_run / "samples" / f"suite-step-{step}.png").is_file()  # the scored images, 18 of them
    assert logged[2]["eval/fid"] != logged[4]["eval/fid"]  # the weights moved between the two


def test_sd3train_eval_gives_the_training_numbers_on_the_same_checkpoint(suite_run, tmp_path):
    logged = logged_suite(suite_run)
    for step in STEPS:
        out = tmp_path / f"step-{step}.json"
        result = subprocess.run([str(BIN / "sd3train-eval"), f"checkpoint={suite_run / 'checkpoints' / f'step-{step:07d}'}",
                                 f"out={out}", "device=cpu"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads(out.read_text())
        assert record["step"] == step and record["images"] == 18
        assert set(record["metrics"]) == set(logged[step])
        for name, value in record["metrics"].items():
            assert value == pytest.approx(logged[step][name], rel=1e-5, abs=1e-9), name
        with open(tmp_path / "metrics.csv", newline="") as handle:  # the row beside the JSON
            rows = [row for row in csv.DictReader(handle) if row["step"] == str(step)]
        assert float(rows[0]["eval/fid"]) == pytest.approx(record["metrics"]["eval/fid"])


@pytest.mark.slow  # 25 s; tests/unit/eval/test_fid.py covers the stats round trip in the default run
def test_saved_reference_stats_give_the_same_fid_as_the_shards(suite_run, tmp_path):
    stats = tmp_path / "reference.pt"
    checkpoint = suite_run / "checkpoints" / "step-0000004"
    result = subprocess.run([str(BIN / "sd3train-eval"), f"checkpoint={checkpoint}", f"save_reference_stats={stats}",
                             "suite=[fid,kid]", f"out={tmp_path / 'saved.json'}", "device=cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert stats.is_file()
    result = subprocess.run([str(BIN / "sd3train-eval"), f"checkpoint={checkpoint}", f"reference_stats={stats}",
                             "reference_shards=null", "suite=[fid,kid]", f"out={tmp_path / 'loaded.json'}", "device=cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "saved.json").read_text())["metrics"]
    loaded = json.loads((tmp_path / "loaded.json").read_text())["metrics"]
    assert loaded == saved
    assert saved["eval/fid"] == pytest.approx(logged_suite(suite_run)[4]["eval/fid"], rel=1e-5)


@pytest.mark.parametrize("argument, key", [("inception_weights=/nonexistent/pt_inception.pth", "eval.inception_weights"),
                                           pytest.param("suite=[fid,lpips]", "eval.suite", marks=pytest.mark.slow)])
def test_a_bad_setting_fails_before_sampling_naming_the_key(suite_run, tmp_path, argument, key):
    out = tmp_path / "never.json"
    result = subprocess.run([str(BIN / "sd3train-eval"), f"checkpoint={suite_run / 'checkpoints' / 'last'}",
                             argument, f"out={out}", "device=cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert key in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
