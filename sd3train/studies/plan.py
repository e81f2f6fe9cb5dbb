"""A study's jobs (arm x seed), their run directories, their training configs and which are done.

    <paths.runs_dir>/studies/<study>/
      <arm>-seed<seed>/      one training run each (sd3train-train's run directory)
      failed.json            jobs whose training failed (exit status), not retried unless asked
      report.md, *.png, plots.json    written by sd3train/studies/report.py

    plan = plan_study(spec, extra)     # every job's config composed and validated, before anything runs
    plan.to_run()                      # the jobs a (re)run trains: only the missing ones

A job's state (`job_state`):
  done          its run published the checkpoint of its last step (trainer.max_steps) and its
                metrics.csv holds every metric the study reports at that step or later
  not started, at step N of M    (never started, or preempted or killed: it resumes from its checkpoint)
  failed        its training exited with an error (failed.json): a non-finite loss, out of memory...
  stale         its run directory holds a run of another config (another scale, learning rate...):
                it is never resumed or overwritten; use another paths.runs_dir
  not evaluated    trained to its last step, but a metric is missing at the end (killed between
                the last checkpoint and the end-of-run evaluation, or a metric the run never logs)
Only the first two are trained by a rerun (and failed ones with retry_failed=true).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sd3train.checkpoint.step_dirs import CHECKPOINTS_DIR, complete_checkpoints
from sd3train.config.schema import TrainConfig
from sd3train.config.typed import ConfigError, to_plain
from sd3train.durable import write_json_atomic
from sd3train.studies.spec import DERIVED_METRICS, StudySpec
from sd3train.tools.plot_eval import read_series

STUDIES_DIR = "studies"  # under paths.runs_dir
FAILED_FILE = "failed.json"
# What sd3train-train's exit statuses mean (sd3train/runtime/exit_codes.py), for the report.
EXIT_REASONS = {2: "invalid config", 3: "non-finite loss", 4: "out of memory", 5: "bad-data budget exceeded"}


def is_launcher_override(override: str) -> bool:
    """Overrides of Hydra itself (the launcher, the sweep folder): passed to the multirun only."""
    return override_key(override) == "hydra" or override_key(override).startswith(("hydra/", "hydra."))


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def last_wins(overrides: list[str]) -> list[str]:
    """`overrides` with each key once, at its last value (so the command line beats the study's
    base and arm; shard keys would otherwise be joined into one list by normalise_overrides)."""
    last = {override_key(override): index for index, override in enumerate(overrides)}
    return [override for index, override in enumerate(overrides) if last[override_key(override)] == index]


@dataclass(frozen=True)
class Job:
    arm: str
    seed: int
    run_dir: Path
    max_steps: int
    config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # resolved, plain

    @property
    def run_name(self) -> str:
        return run_name(self.arm, self.seed)


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def study_root(runs_dir: str | Path, study: str) -> Path:
    return Path(runs_dir) / STUDIES_DIR / study


def arm_overrides(spec: StudySpec, arm: str, extra: list[str], runs_dir: str | Path) -> list[str]:
    """What every seed of `arm` trains with: the study's base, the arm's own, the command line's
    (last, so they win), then where the run goes and how W&B groups it."""
    return last_wins([*spec.base, *spec.arms[arm], *extra,
                      f"experiment_name={spec.name}",
                      f"paths.runs_dir={Path(runs_dir) / STUDIES_DIR}",
                      "paths.sweep_suffix=false",  # the run name below is already one per job
                      f"logger.group={STUDIES_DIR}/{spec.name}"])


def job_config(spec: StudySpec, arm: str, seed: int, extra: list[str], runs_dir: str | Path) -> TrainConfig:
    from sd3train.config.compose import compose_config

    overrides = [o for o in arm_overrides(spec, arm, extra, runs_dir) if not is_launcher_override(o)]
    return compose_config([*overrides, f"trainer.seed={seed}", f"run_name={run_name(arm, seed)}"])


def runs_dir_of(extra: list[str]) -> str:
    """paths.runs_dir as the command line's overrides leave it (default: runs)."""
    from sd3train.config.compose import compose_raw

    return str(compose_raw([o for o in extra if override_key(o) == "paths.runs_dir"]).paths.runs_dir)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs; keys only one side has (a newer
    sd3train's additions) are not differences."""
    found = []
    for key in old.keys() & new.keys():
        if isinstance(old[key], dict) and isinstance(new[key], dict):
            found += config_differences(old[key], new[key], f"{prefix}{key}.")
        elif old[key] != new[key]:
            found.append(f"{prefix}{key}: {old[key]!r} there, {new[key]!r} now")
    return sorted(found)


def run_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric's (optimizer step, value) points in a run's metrics.csv; none before it exists."""
    metrics = run_dir / "metrics.csv"
    return read_series(metrics, wanted=lambda name: True) if metrics.is_file() else {}


def job_state(job: Job, metrics: list[str], failed: dict | None = None) -> str:
    """'done', or what it is instead (module docstring)."""
    if not job.run_dir.is_dir():
        return "not started"
    written = job.run_dir / "config.yaml"
    if job.config and written.is_file():
        from omegaconf import OmegaConf

        differences = config_differences(OmegaConf.to_container(OmegaConf.load(written)), job.config)
        if differences:
            return f"stale (another config ran there: {'; '.join(differences[:3])})"
    steps = [step for step, _ in complete_checkpoints(job.run_dir / CHECKPOINTS_DIR)]
    final = max(steps) if steps else 0
    if job.run_name in (failed or {}):
        status = failed[job.run_name]
        return f"failed at step {final} (exit status {status}: {EXIT_REASONS.get(status, 'error')})"
    if final < job.max_steps:
        return f"at step {final} of {job.max_steps}"
    series = run_series(job.run_dir)
    # read_series gives a row of step k as k + 1: the validation after the last step is max_steps.
    absent = [metric for metric in metrics
              if metric not in DERIVED_METRICS and not (series.get(metric) and series[metric][-1][0] >= job.max_steps)]
    return f"not evaluated (metrics.csv has no {', '.join(absent)} at step {job.max_steps})" if absent else "done"


@dataclass
class StudyPlan:
    spec: StudySpec
    extra: list[str]  # the command line's overrides, to every job
    runs_dir: str
    jobs: list[Job]
    model_sizes: dict = field(default_factory=dict, repr=False)  # arm -> (parameters, FLOPs): report.model_size

    @property
    def root(self) -> Path:
        return study_root(self.runs_dir, self.spec.name)

    def failed(self) -> dict[str, int]:
        """{run name: exit status} of the jobs whose training failed."""
        path = self.root / FAILED_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def record_failed(self, job: Job, status: int) -> None:
        write_json_atomic(self.root / FAILED_FILE, {**self.failed(), job.run_name: status})

    def forget_failed(self, jobs: list[Job]) -> None:
        names = {job.run_name for job in jobs}
        if self.failed().keys() & names:
            write_json_atomic(self.root / FAILED_FILE, {k: v for k, v in self.failed().items() if k not in names})

    def states(self) -> dict[Job, str]:
        failed = self.failed()
        return {job: job_state(job, self.spec.metrics, failed) for job in self.jobs}

    def to_run(self, retry_failed: bool = False, states: dict[Job, str] | None = None) -> list[Job]:
        """The jobs a run trains: not started or stopped part-way (and failed ones when asked);
        `states` when the caller has them already."""
        runnable = ("not started", "at step") + (("failed",) if retry_failed else ())
        return [job for job, state in (states or self.states()).items() if state.startswith(runnable)]


def plan_study(spec: StudySpec, extra: list[str]) -> StudyPlan:
    """Every job of `spec` with `extra` overrides, each config composed and validated first: a bad
    arm fails here, naming the arm, before any job runs."""
    runs_dir = runs_dir_of(extra)
    jobs, problems = [], []
    for arm in spec.arms:
        # Composed and validated once per arm: its seeds differ in trainer.seed and run_name only.
        try:
            cfg = job_config(spec, arm, spec.seeds[0], extra, runs_dir)
        except ConfigError as error:
            problems += [f"arm {arm}: {problem}" for problem in error.problems]
            continue
        except Exception as error:  # Hydra's own: an unknown group option, a malformed override
            problems.append(f"arm {arm}: {str(error).splitlines()[0]}")
            continue
        if not cfg.logger.csv:
            problems.append(f"arm {arm}: logger.csv=false, but the study reads each run's metrics.csv")
        plain = json.loads(json.dumps(to_plain(cfg)))  # tuples as lists, as config.yaml reads back
        for seed in spec.seeds:
            config = {**plain, "run_name": run_name(arm, seed), "trainer": {**plain["trainer"], "seed": seed}}
            jobs.append(Job(arm, seed, study_root(runs_dir, spec.name) / run_name(arm, seed), cfg.trainer.max_steps,
                            config))
    if problems:
        raise ConfigError(problems)
    return StudyPlan(spec, list(extra), runs_dir, jobs)
