"""On a real SLURM: sd3train-precompute as a 4-task array job, submitted with sd3train-submit and
the launch/slurm/curate.sbatch template, writes the same cache as one task run directly."""

from __future__ import annotations

import subprocess

from sd3train.data.tar_writer import sha256_file
from sd3train.tools.make_shapes import build_shapes
from tests.support.slurm_jobs import BIN, SLURM_ENV, job_field, requires_slurm, submit, wait_for

pytestmark = requires_slurm()


def test_precompute_array_of_four_tasks_writes_the_one_task_cache(tmp_path):
    sources = tmp_path / "sources"
    build_shapes(sources, train=4 * 12, val=4, size=32, samples_per_shard=12)
    settings = ["--batch-size", "4", "experiment=tiny_cpu", "data.resolution=32",
                f"data.shards={sources}/train-{{000000..000003}}.tar"]
    one = subprocess.run([str(BIN / "sd3train-precompute"), "--out", str(tmp_path / "one"), *settings],
                         capture_output=True, text=True, env=SLURM_ENV, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    job = submit(["--tool", "precompute", "--array", "0-3", "--gpus-per-node", "0", "--cpus-per-task", "1",
                  "--time", "00:10:00", "--", "--out", str(tmp_path / "array"), *settings], cwd=tmp_path)
    wait_for(job)
    logs = sorted(tmp_path.glob(f"slurm-sd3-precompute-{job}_*.out"))
    assert len(logs) == 4, logs
    # Each task took its index from the array and did exactly its own shard.
    tasks = sorted(line.split(":")[1].strip() for log in logs for line in log.read_text().splitlines()
                   if "shard(s)," in line and ": task " in line)
    assert tasks == [f"task {index} of 4" for index in range(4)], [log.read_text()[-1500:] for log in logs]
    assert all(job_field(f"{job}_{index}", "JobState") == "COMPLETED" for index in range(4))
    hashes = {path.name: sha256_file(path) for path in sorted((tmp_path / "one").glob("*.tar"))}
    assert len(hashes) == 4
    assert {path.name: sha256_file(path) for path in sorted((tmp_path / "array").glob("*.tar"))} == hashes
    assert (tmp_path / "array" / "cache_info.json").read_bytes() == (tmp_path / "one" / "cache_info.json").read_bytes()
