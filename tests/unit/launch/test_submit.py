"""sd3train-submit --dry-run prints the exact sbatch script it would submit."""

from __future__ import annotations

import subprocess

from sd3train.submit import TEMPLATE, main, render, submitting_venv


def _dry_run(capsys, *args: str) -> str:
    assert main(["--dry-run", *args]) == 0
    return capsys.readouterr().out


def test_dry_run_for_four_nodes_of_eight_gpus(capsys, tmp_path):
    script = _dry_run(capsys, "--nodes", "4", "--gpus-per-node", "8", "experiment=tiny_cpu")
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=sd3train",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --time=24:00:00",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR1@180",
        "#SBATCH --output=slurm-%x-%j.out",
    ]
    assert 'OVERRIDES=(experiment=tiny_cpu "$@")' in script.splitlines()
    assert "srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \\" in script
    assert '    sd3train-train trainer.devices="${SLURM_NTASKS_PER_NODE}" \\' in script
    # The job uses the environment sd3train-submit runs from, unless SD3TRAIN_VENV says otherwise.
    venv = submitting_venv() or ".venv"
    assert f'source "${{SD3TRAIN_VENV:-{venv}}}/bin/activate"' in script.splitlines()
    # Everything but the #SBATCH block, the overrides and the environment is the template's.
    kept = ("#SBATCH", "OVERRIDES=", "source ")
    template = [line for line in TEMPLATE.read_text().splitlines() if not line.startswith(kept)]
    assert [line for line in script.splitlines() if not line.startswith(kept)] == template
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # valid bash


def test_every_flag_reaches_the_script_and_overrides_pass_verbatim(capsys):
    script = _dry_run(
        capsys, "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1",
        "--mem", "8G", "--time", "00:10:00", "--partition", "debug", "--account", "lab", "--qos", "high",
        "--job-name", "tiny", "--signal-lead", "90", "--sbatch-arg=--exclusive", "--sbatch-arg=--constraint=a100",
        "experiment=tiny_cpu", "data.shards=/d/{00000..00009}.tar", "eval.prompts=[a red circle]",
    )
    for line in ("--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=8G", "--time=00:10:00",
                 "--partition=debug", "--account=lab", "--qos=high", "--job-name=tiny", "--signal=USR1@90",
                 "--exclusive", "--constraint=a100"):
        assert f"#SBATCH {line}" in script.splitlines(), line
    assert not any(line.startswith("#SBATCH --gpus-per-node") for line in script.splitlines())  # CPU tasks
    assert "OVERRIDES=(experiment=tiny_cpu 'data.shards=/d/{00000..00009}.tar' 'eval.prompts=[a red circle]' \"$@\")" in script


def test_bad_flags_are_usage_errors(capsys):
    assert main(["--dry-run", "--nodes", "0", "experiment=tiny_cpu"]) == 2
    assert "--nodes must be >= 1" in capsys.readouterr().err
    assert main(["--dry-run", "--tasks-per-node", "2", "experiment=tiny_cpu"]) == 2
    assert "only for CPU tasks" in capsys.readouterr().err


def test_a_curation_tool_is_an_array_job_with_its_flags_after_the_separator(capsys, tmp_path):
    script = _dry_run(capsys, "--tool", "precompute", "--array", "0-63%16", "--gpus-per-node", "1", "--",
                      "--out", "/data/cache", "--batch-size", "32", "experiment=tiny_cpu", "data.shards=/d/{0..9}.tar")
    lines = script.splitlines()
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=sd3-precompute",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --time=24:00:00",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --array=0-63%16",
        "#SBATCH --output=slurm-%x-%A_%a.out",
    ]
    assert "TOOL=precompute" in lines
    assert "OVERRIDES=(--out /data/cache --batch-size 32 experiment=tiny_cpu 'data.shards=/d/{0..9}.tar' \"$@\")" in lines
    assert 'srun ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} "sd3train-${TOOL}" "${OVERRIDES[@]}"' in lines
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    dedup = _dry_run(capsys, "--tool", "dedup", "--array", "0-7", "--", "embed", "--out", "/data/dedup")
    assert "TOOL=dedup" in dedup.splitlines() and "OVERRIDES=(embed --out /data/dedup \"$@\")" in dedup.splitlines()


def test_array_and_tool_must_come_together(capsys):
    assert main(["--dry-run", "--array", "0-3", "experiment=tiny_cpu"]) == 2
    assert "--array is for curation tools" in capsys.readouterr().err
    assert main(["--dry-run", "--tool", "caption", "--", "--out", "x"]) == 2
    assert "--tool caption needs --array" in capsys.readouterr().err
    assert main(["--dry-run", "--tool", "caption", "--array", "zero-to-three"]) == 2
    assert "is not one range of SLURM's array syntax" in capsys.readouterr().err
    # A list of indices does not give the tasks the numbering their shard split uses.
    assert main(["--dry-run", "--tool", "caption", "--array", "0,4,8"]) == 2
    assert "submit the whole range again" in capsys.readouterr().err
    assert main(["--dry-run", "--tool", "caption", "--array", "0-62:2%8", "--", "--out", "x"]) == 0


def test_an_environment_path_with_shell_characters_stays_one_word(tmp_path):
    venv = '/opt/my "env" $HOME `x`'
    script = render(TEMPLATE.read_text(), ["#SBATCH --nodes=1"], [], venv=venv)
    line = next(line for line in script.splitlines() if line.startswith("source "))
    printed = subprocess.run(["bash", "-c", line.replace("source ", "printf %s ", 1)], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin"})
    assert printed.stdout == venv + "/bin/activate"
