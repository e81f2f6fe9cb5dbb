"""On a real SLURM: a Hydra multirun through the submitit launcher (conf/hydra/launcher/slurm.yaml)
runs each combination as its own SLURM job, in its own run directory."""

from __future__ import annotations

import subprocess

from omegaconf import OmegaConf

from tests.support.slurm_jobs import BIN, SLURM_ENV, requires_slurm

pytestmark = requires_slurm()


def test_submitit_sweep_trains_one_job_per_value_in_its_own_run_directory(small_shapes, tmp_path):
    result = subprocess.run([
        str(BIN / "sd3train-train"), "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", "experiment=tiny_cpu",
        "trainer.accelerator=cpu", "trainer.max_steps=3", "model.depth=1", "data.batch_size=4", "data.num_workers=0",
        f"data.shards={small_shapes}/train-{{000000..000003}}.tar", "data.val_shards=null", "eval.prompts=[]",
        "eval.samples_per_caption=0", "logger.wandb=false", "trainer.progress_bar=false",
        f"paths.runs_dir={tmp_path / 'runs'}", "optim.lr=1e-4,2e-4",
    ], cwd=tmp_path, capture_output=True, text=True, env=SLURM_ENV, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    runs = tmp_path / "runs" / "tiny_cpu"
    learning_rates = {}
    for number in (0, 1):
        [run_dir] = runs.glob(f"main-{number}-*")  # main-<job number>-<digest of its overrides>
        assert (run_dir / "checkpoints" / "step-0000003" / "COMPLETE").is_file(), sorted(runs.rglob("*"))[:40]
        learning_rates[number] = OmegaConf.load(run_dir / "config.yaml").optim.lr
    assert learning_rates == {0: 1e-4, 1: 2e-4}
    # submitit's job folders (its sbatch scripts and logs) sit in the sweep directory.
    scripts = list((runs / "sweep-main" / ".submitit").rglob("*_submission.sh"))
    assert scripts and "#SBATCH --requeue" in scripts[0].read_text() and "#SBATCH --signal=USR1@180" in scripts[0].read_text()
