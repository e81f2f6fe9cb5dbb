"""Every shipped study runs end to end at toy size through sd3train-study (real Hydra multiruns of
sd3train-train on a precompute cache) and renders its report; a study killed half-way trains only
its missing arms when run again. Slow: each study trains one seed of each arm for 4 steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd3train.curation.precompute import main as precompute
from sd3train.studies.plan import job_state, plan_study
from sd3train.studies.report import curve_plot_name
from sd3train.studies.spec import load_study, study_names
from sd3train.tools.make_shapes import build_shapes

REPO = Path(__file__).resolve().parents[2]
TRAIN = "train-{000000..000003}.tar"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    build_shapes(root / "shapes", train=64, val=8, samples_per_shard=16)
    for shards in (TRAIN, "val-000000.tar"):  # as `make data` writes it, smaller
        assert precompute(["--out", str(root / "cache"), "experiment=shapes_cpu", "data.cached=false",
                           f"data.shards='{root}/shapes/{shards}'"]) == 0
    return root


def toy_overrides(cache: Path, runs: Path) -> list[str]:
    """What makes any study toy-sized: 4 steps of batch 4 on the toy cache, 2 sampler steps, one
    sample per caption; the model's size stays the arms' own."""
    return ["seeds=[0]", f"data.shards='{cache}/cache/{TRAIN}'", f"data.val_shards='{cache}/cache/val-000000.tar'",
            f"paths.runs_dir={runs}", "trainer.max_steps=4", "trainer.val_every_n_steps=2",
            "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=2", "data.batch_size=4",
            "model.compile=false", "eval.samples_per_caption=1", "eval.sample_every_n_steps=0",
            "diffusion.sampler.num_steps=2", "logger.wandb=false"]


def study(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "sd3train.study", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.parametrize("name", ["sd3_table1", "architecture", "qk_norm", "text_encoders", "scaling"])
def test_each_study_runs_end_to_end_and_its_report_renders(cache, tmp_path, name):
    assert name in study_names()
    log = tmp_path / "study.log"
    suite = ["eval.every_n_steps=4", "eval.prompts_per_category=2"] if name == "text_encoders" else []
    process = study([f"study={name}", *toy_overrides(cache, tmp_path / "runs"), *suite], log)
    assert process.wait(timeout=900) == 0, log.read_text()[-3000:]
    root = tmp_path / "runs" / "studies" / name
    spec = load_study(name)
    report = (root / "report.md").read_text()
    assert f"{len(spec.arms)} of {len(spec.arms)} runs finished" in report and "Nothing: every run finished." in report
    plots = json.loads((root / "plots.json").read_text())["plots"]
    expected = [curve_plot_name(m) for m in spec.curves] if "curves" in spec.plots else []
    expected += [plot for plot in spec.plots if plot != "curves"]
    for plot in expected:
        assert (root / f"{plot}.png").stat().st_size > 1000, plot
        assert f"![{plot}]({plot}.png)" in report
        assert set(plots[plot]) == set(spec.arms), plot  # one series per arm
    for arm in spec.arms:
        assert f"| {arm} | 1 |" in report


def test_a_killed_study_reruns_only_its_missing_arms(cache, tmp_path):
    file = tmp_path / "toy.yaml"
    file.write_text("title: two arms\nbase: [experiment=shapes_cpu]\nseeds: [0]\n"
                    "metrics: [val/loss, eval/colour_adherence]\nplots: [curves]\n"
                    "arms:\n  first: [optim.lr=1e-3]\n  second: [optim.lr=2e-3]\n")
    args = [f"study={file}", *toy_overrides(cache, tmp_path / "runs")[1:]]
    spec = load_study(str(file))
    plan = plan_study(spec, args[1:])
    first, second = plan.jobs
    process = study(args, tmp_path / "first.log")
    deadline = time.monotonic() + 600
    while job_state(first, spec.metrics) != "done":  # kill once the first arm is done
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert job_state(second, spec.metrics) != "done"
    kept = (first.run_dir / "metrics.csv").read_bytes()
    log = tmp_path / "second.log"
    assert study(args, log).wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "2 jobs, 1 done, 1 to run" in text and "arm second: seeds [0]" in text and "arm first:" not in text
    assert (first.run_dir / "metrics.csv").read_bytes() == kept  # the finished arm did not train again
    assert job_state(second, spec.metrics) == "done"
    assert "2 of 2 runs finished" in (tmp_path / "runs" / "studies" / "toy" / "report.md").read_text()
