"""sd3train-study's command line: study keys, training overrides, and bad input failing before any job."""

import pytest

from sd3train.study import main, split_arguments
from sd3train.studies.launch import StudyBusyError, arm_command, study_lock, uses_basic_launcher
from sd3train.studies.plan import plan_study
from sd3train.studies.spec import load_study


def test_arguments_split_into_study_keys_and_training_overrides():
    name, values, flags, extra = split_arguments(
        ["study=sd3_table1", "seeds=[0,1,2]", "report_only=true", "trainer.max_steps=9", "hydra/launcher=slurm"])
    assert (name, values, flags, extra) == ("sd3_table1", {"seeds": [0, 1, 2]},
                                            {"report_only": True, "retry_failed": False},
                                            ["trainer.max_steps=9", "hydra/launcher=slurm"])


def test_usage_errors_exit_2_before_anything_runs(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["seeds=[0]"])
    assert exit_info.value.code == 2 and "study=NAME required" in capsys.readouterr().err
    for bad, message in (("report_only=ture", "report_only must be true or false"), ("seeds=[0,1", "cannot parse")):
        with pytest.raises(SystemExit):
            main(["study=sd3_table1", bad])
        assert message in capsys.readouterr().err
    assert main(["study=nope", f"paths.runs_dir={tmp_path}"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert main(["study=sd3_table1", "optim.lr=fast", f"paths.runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "arm uniform: optim.lr" in err
    assert not (tmp_path / "studies").exists()


def test_each_arm_is_one_multirun_over_its_seeds_named_per_job(tmp_path):
    plan = plan_study(load_study("sd3_table1"), [f"paths.runs_dir={tmp_path}", "hydra/launcher=slurm"])
    command = arm_command(plan, "cosmap", [0, 1])
    assert command[1:4] == ["-m", "sd3train.train", "-m"]
    assert "diffusion.density=cosmap" in command and "trainer.seed=0,1" in command
    assert "run_name=cosmap-seed${trainer.seed}" in command and "paths.sweep_suffix=false" in command
    assert f"paths.runs_dir={tmp_path}/studies" in command and "logger.group=studies/sd3_table1" in command
    assert "hydra/launcher=slurm" in command and not uses_basic_launcher(plan.extra)
    assert not uses_basic_launcher(["+hydra/launcher=slurm"])
    assert uses_basic_launcher([]) and uses_basic_launcher(["hydra/launcher=basic"])


def test_one_study_runs_at_a_time_in_its_folder(tmp_path):
    with study_lock(tmp_path / "toy"):
        with pytest.raises(StudyBusyError, match="another sd3train-study"):
            with study_lock(tmp_path / "toy"):
                pass
    with study_lock(tmp_path / "toy"):  # released
        pass


def test_command_line_overrides_replace_the_study_s_own():
    plan = plan_study(load_study("sd3_table1"), ["trainer.max_steps=7", "data.shards='/x/{0..1}.tar'"])
    command = arm_command(plan, "uniform", [0])
    assert [c for c in command if c.startswith("trainer.max_steps=")] == ["trainer.max_steps=7"]
    assert plan.jobs[0].max_steps == 7
