"""sd3train-submit --dry-run prints the exact sbatch script it would submit."""

from __future__ import annotations

import subprocess

from sd3train.submit import TEMPLATE, main


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
    assert 'srun --kill-on-bad-exit=1 sd3train-train trainer.devices="${SLURM_NTASKS_PER_NODE}" \\' in script
    # Everything but the #SBATCH block and the overrides is the template's.
    template = [line for line in TEMPLATE.read_text().splitlines() if not line.startswith(("#SBATCH", "OVERRIDES="))]
    assert [line for line in script.splitlines() if not line.startswith(("#SBATCH", "OVERRIDES="))] == template
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
