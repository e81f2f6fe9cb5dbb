"""On a real SLURM: sd3train-study with hydra/launcher=slurm submits every arm's jobs at once through
submitit, and reports them as on one machine."""

from __future__ import annotations

import subprocess

from sd3train.studies.plan import job_state, plan_study
from sd3train.studies.spec import load_study
from tests.support.slurm_jobs import BIN, SLURM_ENV, requires_slurm

pytestmark = requires_slurm()


def test_a_study_runs_its_arms_as_slurm_jobs(small_shapes, tmp_path):
    file = tmp_path / "pair.yaml"
    file.write_text("title: two learning rates\nbase: [experiment=tiny_cpu, model.depth=1]\nseeds: [0]\n"
                    "metrics: [val/loss]\nplots: [curves]\narms:\n  low: [optim.lr=1e-4]\n  high: [optim.lr=2e-4]\n")
    args = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10", "trainer.accelerator=cpu", "trainer.max_steps=3", "data.batch_size=4",
            "data.num_workers=0", f"data.shards={small_shapes}/train-{{000000..000003}}.tar",
            f"data.val_shards={small_shapes}/val-000000.tar", "trainer.val_every_n_steps=3", "eval.prompts=[]",
            "eval.samples_per_caption=0", "logger.wandb=false", "trainer.progress_bar=false",
            f"paths.runs_dir={tmp_path / 'runs'}"]
    result = subprocess.run([str(BIN / "sd3train-study"), f"study={file}", *args], cwd=tmp_path, capture_output=True,
                            text=True, env=SLURM_ENV, timeout=500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    spec = load_study(str(file))
    plan = plan_study(spec, args)
    assert [job_state(job, spec.metrics) for job in plan.jobs] == ["done", "done"]
    root = tmp_path / "runs" / "studies" / "pair"
    assert list((root / ".multirun" / "low" / ".submitit").rglob("*_submission.sh"))  # submitted through submitit
    assert "2 of 2 runs finished" in (root / "report.md").read_text()
