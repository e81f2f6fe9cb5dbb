"""A study's plan and report on run folders in sd3train-train's on-disk layout: which jobs are done,
what a partial study reports, the table's mean and spread, and one series per arm in every plot.
(The studies run end to end in tests/integration/test_studies.py.)"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sd3train.checkpoint.step_dirs import step_dir_name, write_marker
from sd3train.config.typed import ConfigError
from sd3train.studies.plan import plan_study
from sd3train.studies.report import collect, curve_plot_name, draw_plot, plot_series, power_law, write_report
from sd3train.studies.spec import load_study, study_names

STEPS = 6
T_VALUES = (0.0, 0.5)


def write_study(tmp_path: Path, arms: dict[str, list[str]], plots: str = "[curves, loss_per_t, grids]",
                extra: str = "") -> Path:
    path = tmp_path / "toy.yaml"
    arm_lines = "\n".join(f"  {arm}: [{', '.join(overrides)}]" for arm, overrides in arms.items())
    path.write_text(f"title: a toy study\nbase: [experiment=tiny_cpu, trainer.max_steps={STEPS}]\nseeds: [0, 1]\n"
                    f"metrics: [val/loss, eval/colour_adherence]\nplots: {plots}\ncurves: [val/loss, train/loss]\n"
                    f"arms:\n{arm_lines}\n{extra}")
    return path


def fake_run(run_dir: Path, final_step: int, val: list[float], colour: float | None) -> None:
    """A run folder as sd3train-train leaves it: a published checkpoint of `final_step`, and
    metrics.csv with validation rows (val[i] after step 2(i+1)) and the end-of-run evaluation."""
    staging = run_dir / "checkpoints" / step_dir_name(final_step)
    staging.mkdir(parents=True)
    (staging / "checkpoint.ckpt").write_bytes(b"weights")
    write_marker(staging, {"step": final_step})
    columns = ["step", "train/loss", "val/loss", *(f"val/loss_t{t:.3f}" for t in T_VALUES), "eval/colour_adherence"]
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for index, value in enumerate(val):
            step = 2 * (index + 1) - 1  # Lightning's row of the validation after optimizer step 2(i+1)
            writer.writerow({"step": step, "train/loss": value + 0.1})
            writer.writerow({"step": step, "val/loss": value, "val/loss_t0.000": value * 2, "val/loss_t0.500": value / 2})
        if colour is not None:
            writer.writerow({"step": final_step, "eval/colour_adherence": colour})
    image = Image.new("RGB", (16, 16), (200, 0, 0))
    (run_dir / "samples").mkdir()
    image.save(run_dir / "samples" / f"eval-step-{final_step}.png")


@pytest.fixture
def toy(tmp_path):
    spec = load_study(str(write_study(tmp_path, {"a": ["optim.lr=1e-3"], "b": ["optim.lr=2e-3"]})))
    plan = plan_study(spec, [f"paths.runs_dir={tmp_path / 'runs'}"])
    return spec, plan


def test_every_shipped_study_is_valid_and_every_job_config_composes():
    assert {"sd3_table1", "qk_norm", "scaling"} <= set(study_names())
    for name in study_names():
        spec = load_study(name)
        plan = plan_study(spec, [])
        assert len(plan.jobs) == len(spec.arms) * len(spec.seeds), name
        assert len({job.run_dir for job in plan.jobs}) == len(plan.jobs), name


def test_a_bad_arm_fails_before_anything_runs_naming_the_arm(tmp_path):
    spec = load_study(str(write_study(tmp_path, {"good": ["optim.lr=1e-3"], "bad": ["optim.lr=fast"]})))
    with pytest.raises(ConfigError) as error:
        plan_study(spec, [f"paths.runs_dir={tmp_path}"])
    assert "arm bad" in str(error.value) and "optim.lr" in str(error.value)
    assert "arm good" not in str(error.value)


def test_study_file_problems_are_listed_with_the_key(tmp_path):
    path = write_study(tmp_path, {"a b": ["trainer.seed=3"]}, plots="[curves, pie]", extra="seeds_typo: [1]\n")
    with pytest.raises(ConfigError) as error:
        load_study(str(path))
    message = str(error.value)
    assert "seeds_typo: unknown key" in message
    with pytest.raises(ConfigError, match="no study 'nope'"):
        load_study("nope")
    path = write_study(tmp_path, {"a b": ["trainer.seed=3"]}, plots="[curves, pie]")
    message = str(pytest.raises(ConfigError, load_study, str(path)).value)
    assert "arms.a b: an arm's name" in message and "arms.a b: trainer.seed, run_name" in message and "unknown plot 'pie'" in message


def test_done_needs_the_last_step_published_and_every_metric(toy):
    spec, plan = toy
    run = {job.run_name: job.run_dir for job in plan.jobs}
    fake_run(run["a-seed0"], STEPS, [1.0, 0.8, 0.6], colour=0.5)
    fake_run(run["a-seed1"], STEPS, [1.1, 0.9, 0.7], colour=0.7)
    fake_run(run["b-seed0"], 4, [1.0, 0.9], colour=None)  # preempted at step 4
    fake_run(run["b-seed1"], STEPS, [1.0, 0.9, 0.8], colour=None)  # trained, its evaluation lost
    states = {job.run_name: state for job, state in plan.states().items()}
    assert states == {"a-seed0": "done", "a-seed1": "done", "b-seed0": f"at step 4 of {STEPS}",
                      "b-seed1": f"not evaluated (metrics.csv has no eval/colour_adherence at step {STEPS})"}
    # A rerun trains what stopped part-way; a trained run would resume at its end and train nothing.
    assert [job.run_name for job in plan.to_run()] == ["b-seed0"]


def test_stale_and_failed_runs_are_never_resumed(toy, tmp_path):
    spec, plan = toy
    run = {job.run_name: job for job in plan.jobs}
    fake_run(run["a-seed0"].run_dir, STEPS, [1.0, 0.8, 0.6], colour=0.5)
    (run["a-seed0"].run_dir / "config.yaml").write_text(yaml.safe_dump({**run["a-seed0"].config, "optim": {
        **run["a-seed0"].config["optim"], "lr": 0.5}, "a_key_of_an_older_sd3train": 1}))
    fake_run(run["a-seed1"].run_dir, 2, [1.0], colour=None)
    (run["a-seed1"].run_dir / "config.yaml").write_text(yaml.safe_dump({**run["a-seed1"].config, "new": 1}))
    plan.record_failed(run["a-seed1"], 3)
    states = {job.run_name: state for job, state in plan.states().items()}
    assert states["a-seed0"] == "stale (another config ran there: optim.lr: 0.5 there, 0.001 now)"
    assert states["a-seed1"] == "failed at step 2 (exit status 3: non-finite loss)"
    assert [job.run_name for job in plan.to_run()] == ["b-seed0", "b-seed1"]
    assert [job.run_name for job in plan.to_run(retry_failed=True)] == ["a-seed1", "b-seed0", "b-seed1"]
    text = write_report(plan, collect(plan)).read_text()
    assert "- `a-seed1`: failed at step 2 (exit status 3: non-finite loss)" in text


def test_a_partial_study_reports_what_finished_and_what_is_missing(toy):
    spec, plan = toy
    run = {job.run_name: job.run_dir for job in plan.jobs}
    fake_run(run["a-seed0"], STEPS, [1.0, 0.8, 0.6], colour=0.5)
    fake_run(run["a-seed1"], STEPS, [1.1, 0.9, 0.7], colour=0.7)
    fake_run(run["b-seed0"], 4, [1.0, 0.9], colour=None)
    report = write_report(plan, collect(plan))
    text = report.read_text()
    mean, spread = statistics.fmean([0.6, 0.7]), statistics.stdev([0.6, 0.7])
    assert f"| 1 | a | 2 | {mean:.4f} ± {spread:.4f} | 0.6000 ± {statistics.stdev([0.5, 0.7]):.4f} |" in text
    assert "| - | b | 0 | - | - |" in text
    assert "- `b-seed0`: at step 4 of 6" in text and "- `b-seed1`: not started" in text
    for name in ("val_loss", "train_loss", "loss_per_t", "grids"):
        assert (report.parent / f"{name}.png").is_file(), name
        assert f"![{name}]({name}.png)" in text
    plots = json.loads((report.parent / "plots.json").read_text())["plots"]
    # The curves take every run with data (b's preempted seed too); final values only finished runs.
    assert set(plots["val_loss"]) == {"a", "b"} and plots["val_loss"]["b"]["seeds"] == 1
    assert plots["val_loss"]["a"]["x"] == [2, 4, 6] and plots["val_loss"]["a"]["y"] == pytest.approx([1.05, 0.85, 0.65])
    assert plots["val_loss"]["a"]["low"] == pytest.approx([1.0, 0.8, 0.6])
    assert set(plots["loss_per_t"]) == {"a"} and plots["loss_per_t"]["a"]["y"] == pytest.approx([1.3, 0.325])
    # Derived: the validation loss without t = 0 (here the t = 0.5 column alone).
    assert [r.final("val/loss_interior") for r in collect(plan) if r.job.arm == "a"] == pytest.approx([0.3, 0.35])


def test_each_plot_draws_one_labelled_series_per_arm(toy):
    spec, plan = toy
    run = {job.run_name: job.run_dir for job in plan.jobs}
    for name in run:
        fake_run(run[name], STEPS, [1.0, 0.8, 0.6 if name.startswith("a") else 0.5], colour=0.5)
    results = collect(plan)
    series = plot_series(plan, results)
    for name in (curve_plot_name("val/loss"), "loss_per_t"):
        figure = draw_plot(name, series[name], {}, "toy")
        labels = [line.get_label() for line in figure.axes[0].get_lines()]
        assert labels == ["a (n=2)", "b (n=2)"], name
    grids = {arm: next(r.grid for r in results if r.job.arm == arm) for arm in spec.arms}
    figure = draw_plot("grids", {}, grids, "toy")
    assert [axis.get_title() for axis in figure.axes] == ["a", "b"]


def test_scaling_plot_fits_a_power_law_through_the_arms(tmp_path):
    spec = load_study(str(write_study(tmp_path, {"d1": ["model.depth=1"], "d2": ["model.depth=2"], "d4": ["model.depth=4"]},
                                      plots="[scaling]")))
    plan = plan_study(spec, [f"paths.runs_dir={tmp_path / 'runs'}"])
    finals = {"d1": 0.9, "d2": 0.7, "d4": 0.55}
    for job in plan.jobs:
        fake_run(job.run_dir, STEPS, [1.0, 0.95, finals[job.arm]], colour=0.5)
    series = plot_series(plan, collect(plan))["scaling"]
    params = [series[arm]["params"] for arm in ("d1", "d2", "d4")]
    assert params[0] < params[1] < params[2]
    a, b = power_law(params, [finals[arm] for arm in ("d1", "d2", "d4")])
    assert b < 0
    figure = draw_plot("scaling", series, {}, "toy")
    for axis in figure.axes:
        labels = [line.get_label() for line in axis.get_lines()]
        assert labels[:3] == ["d1", "d2", "d4"] and labels[3].startswith("fit: ")
    text = write_report(plan, collect(plan)).read_text()
    assert "Power law over params" in text and f"{params[0]:,}" in text


def test_power_law_recovers_its_exponent():
    xs = [1e3, 1e4, 1e5, 1e6]
    a, b = power_law(xs, [5.0 * x ** -0.25 for x in xs])
    assert (a, b) == (pytest.approx(5.0), pytest.approx(-0.25))


def test_the_report_checks_the_paper_s_claims_per_metric(tmp_path):
    spec = load_study(str(write_study(tmp_path, {"a": ["optim.lr=1e-3"], "b": ["optim.lr=2e-3"]},
                                      extra="expect: [a < b]\nnotes: read me\n")))
    plan = plan_study(spec, [f"paths.runs_dir={tmp_path / 'runs'}"])
    for job in plan.jobs:  # a: lower loss, lower colour score
        fake_run(job.run_dir, STEPS, [1.0, 0.8, 0.5 if job.arm == "a" else 0.7], colour=0.4 if job.arm == "a" else 0.6)
    text = write_report(plan, collect(plan)).read_text()
    assert "- `a` better than `b` on val/loss (lower): holds (0.5000 ± 0.0000 against 0.7000 ± 0.0000)" in text
    assert "- `a` better than `b` on eval/colour_adherence (higher): **does not hold**" in text
    assert "**Reading it.** read me" in text
    with pytest.raises(ConfigError, match="expect: 'a < c' is not 'ARM < ARM'"):
        load_study(str(write_study(tmp_path, {"a": [], "b": []}, extra="expect: [a < c]\n")))
