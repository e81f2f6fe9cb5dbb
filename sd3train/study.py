"""Run a study of training choices and report it: arms x seeds as Hydra multiruns, then report.md.

    sd3train-study study=sd3_table1                          # conf/study/sd3_table1.yaml on this machine
    sd3train-study study=sd3_table1 seeds=[0,1,2] trainer.max_steps=20000 model=sd3_medium \\
        hydra/launcher=slurm trainer.devices=8                # the same study on a SLURM cluster
    sd3train-study study=sd3_table1 report_only=true          # rewrite the report from what finished

Arguments are key=value. `study` names the study (conf/study/<study>.yaml) or is the path of a
study file of your own (ending in .yaml); `seeds`, `metrics`, `plots`, `curves`, `rank_higher` and `title`
override the study file's; `report_only=true` trains nothing; `retry_failed=true` trains the jobs
that failed before (failed.json) again. Every other argument is a training
override (or a Hydra one, like hydra/launcher=slurm) given to every job after the study's own, so
it sets the scale. Every job's config is composed and validated before the first one starts.

The runs go to <paths.runs_dir>/studies/<study>/<arm>-seed<seed>/ and the report, its plots and
plots.json to <paths.runs_dir>/studies/<study>/ (sd3train/studies/report.py). A rerun trains only
the jobs not started or stopped part-way (a preempted or killed one resumes from its checkpoints;
the states are in sd3train/studies/plan.py) and rewrites the report. Exit status 0 when every job
is done, 1 when some are not, 2 for a bad argument or a study another sd3train-study is running.
"""

from __future__ import annotations

import sys
from typing import Optional

from sd3train.cli import USAGE_EXIT_CODE, fail

PROG = "sd3train-study"
STUDY_KEYS = ("seeds", "metrics", "plots", "curves", "rank_higher", "title")
FLAGS = ("report_only", "retry_failed")


def split_arguments(argv: list[str]) -> tuple[Optional[str], dict, dict, list[str]]:
    """(study name, study-key overrides, flags, training overrides) of the command line."""
    from omegaconf import OmegaConf

    name, study_values, flags, extra = None, {}, dict.fromkeys(FLAGS, False), []
    for arg in argv:
        key, equals, value = arg.partition("=")
        if key == "study":
            name = value
        elif key in FLAGS:
            if value.lower() not in ("true", "false"):
                fail(PROG, f"{key} must be true or false, got {arg!r}")
            flags[key] = value.lower() == "true"
        elif key in STUDY_KEYS:
            try:
                study_values.update(OmegaConf.to_container(OmegaConf.from_dotlist([arg])))
            except Exception as error:  # OmegaConf's grammar errors are long; the first line names the problem
                fail(PROG, f"cannot parse {arg!r}: {str(error).splitlines()[0]}")
        elif not equals and not arg.startswith("~"):
            fail(PROG, f"arguments must be key=value, got {arg!r}")
        else:
            extra.append(arg)
    return name, study_values, flags, extra


def main(argv: Optional[list[str]] = None) -> int:
    from sd3train.config.overrides import normalise_overrides
    from sd3train.config.typed import ConfigError
    from sd3train.studies.launch import StudyBusyError, run_jobs
    from sd3train.studies.plan import plan_study
    from sd3train.studies.report import collect, write_report
    from sd3train.studies.spec import load_study, study_names

    argv = sys.argv[1:] if argv is None else list(argv)
    name, study_values, flags, extra = split_arguments(argv)
    if not name:
        fail(PROG, f"study=NAME required; known studies: {', '.join(study_names())}")
    try:
        spec = load_study(name, study_values)
        plan = plan_study(spec, normalise_overrides(extra))
    except ConfigError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return USAGE_EXIT_CODE
    states = plan.states()
    to_run = plan.to_run(flags["retry_failed"], states)
    done = sum(state == "done" for state in states.values())
    print(f"{PROG}: {spec.name}: {len(plan.jobs)} jobs, {done} done, {len(to_run)} to run, in {plan.root}",
          file=sys.stderr, flush=True)
    if to_run and not flags["report_only"]:
        try:
            statuses = run_jobs(plan, to_run, log=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True))
        except StudyBusyError as error:
            print(f"{PROG}: {error}", file=sys.stderr)
            return USAGE_EXIT_CODE
        for arm, status in statuses.items():
            if status:
                print(f"{PROG}: arm {arm}: a job failed (exit status {status}); see the report", file=sys.stderr)
    results = collect(plan)
    report = write_report(plan, results)
    left = [f"{r.job.run_name} ({r.state})" for r in results if r.state != "done"]
    print(f"{PROG}: report {report}" + (f"; not done: {', '.join(left)}" if left else ""), file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
