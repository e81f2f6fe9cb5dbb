"""Studies of training choices (sd3train-study): a study file (conf/study/<name>.yaml) names arms of
training overrides and seeds (spec.py); each arm x seed is one sd3train-train run, launched as a
Hydra multirun per arm (launch.py) into a run directory that is a pure function of study, arm and
seed (plan.py), so a rerun trains only what is missing; report.py turns the runs' metrics.csv into
report.md, plots and plots.json."""
