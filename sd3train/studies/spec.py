"""A study: arms (sets of training overrides) x seeds, read from conf/study/<name>.yaml.

    spec = load_study("sd3_table1")                       # StudySpec, every problem listed at once
    spec = load_study("sd3_table1", {"seeds": [0]})       # with the command line's study keys over it

A study file holds only what the study is; the size knobs (steps, batch, model width) are training
overrides, in `base` and on sd3train-study's command line (which wins), so the same study runs at
laptop or cluster scale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from sd3train.config.typed import ConfigError, build_typed
from sd3train.paths import CONF_DIR

STUDY_DIR = CONF_DIR / "study"
# Metrics the report derives from metrics.csv's columns rather than reads (studies/report.py):
# val/loss_interior is the validation loss without t = 0, where the target's noise cannot be told
# from the clean latent (the loss is 1 for a perfect model) and where no sampler ever evaluates.
DERIVED_METRICS = ("val/loss_interior",)
PLOTS = ("curves", "loss_per_t", "grids", "scaling")
# What sd3train-study sets for each job (studies/plan.py), so a study file may not.
RESERVED = ("trainer.seed", "run_name", "experiment_name", "paths.runs_dir", "paths.sweep_suffix", "logger.group",
            "hydra.sweep.dir")
# Arm names become run directory names and W&B names.
_ARM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class StudySpec:
    """One study. `arms` maps an arm's name to its overrides (Hydra syntax, as sd3train-train takes
    them); every arm trains once per seed in `seeds`, each run on top of `base`."""

    title: str
    arms: dict[str, list[str]]
    base: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # The final value of each, per arm, mean and spread over seeds, in the report's table; the
    # first ranks the arms (lower is better).
    metrics: list[str] = field(default_factory=lambda: ["val/loss"])
    rank_higher: bool = False  # the first metric is better higher (an adherence score), not lower (a loss)
    # Plots (sd3train/studies/report.py): "curves" draws each metric of `curves` over steps.
    plots: list[str] = field(default_factory=lambda: ["curves", "loss_per_t", "grids"])
    curves: list[str] = field(default_factory=lambda: ["val/loss"])
    # What the paper found, and what the report should be read against (one paragraph).
    paper: str = ""
    # The paper's claims the report checks: "A < B" is arm A better than arm B on each metric (a
    # lower loss, a higher eval/ score), with both means and spreads; "A < B: m1, m2" on those only.
    expect: list[str] = field(default_factory=list)
    notes: str = ""  # how to read the metrics (printed in the report)
    name: str = ""  # the file's name; set by load_study


def study_names() -> list[str]:
    return sorted(path.stem for path in STUDY_DIR.glob("*.yaml"))


def study_problems(spec: StudySpec) -> list[str]:
    problems = []
    if not spec.arms:
        problems.append("arms: a study needs at least one arm")
    for arm, overrides in spec.arms.items():
        if not _ARM_NAME.match(arm):
            problems.append(f"arms.{arm}: an arm's name may hold letters, digits, '_', '-' and '.' only")
        if any(override.lstrip("+~").split("=", 1)[0] in RESERVED for override in overrides):
            problems.append(f"arms.{arm}: {', '.join(RESERVED)} are the study's to set")
    if any(override.lstrip("+~").split("=", 1)[0] in RESERVED for override in spec.base):
        problems.append(f"base: {', '.join(RESERVED)} are the study's to set")
    if not spec.seeds:
        problems.append("seeds: at least one seed")
    if len(set(spec.seeds)) != len(spec.seeds):
        problems.append(f"seeds: {spec.seeds} repeats a seed")
    if not spec.metrics:
        problems.append("metrics: at least one (the first ranks the arms)")
    problems += [f"plots: unknown plot {plot!r}; expected some of {PLOTS}" for plot in spec.plots if plot not in PLOTS]
    for claim in spec.expect:
        arms, metrics = parse_claim(claim)
        if len(arms) != 2 or any(arm not in spec.arms for arm in arms):
            problems.append(f"expect: {claim!r} is not 'ARM < ARM' with two of the arms {list(spec.arms)}")
        unknown = [metric for metric in metrics if metric not in spec.metrics]
        if unknown:
            problems.append(f"expect: {claim!r} names {unknown}, not among the study's metrics")
    return problems


def parse_claim(claim: str) -> tuple[list[str], list[str]]:
    """'A < B: m1, m2' -> ([A, B], [m1, m2]); no metrics listed: every metric of the study."""
    comparison, _, metrics = claim.partition(":")
    return [part.strip() for part in comparison.split("<")], [m.strip() for m in metrics.split(",") if m.strip()]


def load_study(name: str, overrides: Optional[dict] = None, study_dir: Path = STUDY_DIR) -> StudySpec:
    """conf/study/<name>.yaml (in `study_dir`), or the study file `name` when it ends in .yaml,
    with `overrides` (study keys) over it, checked. The study's name is the file's stem."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else study_dir / f"{name}.yaml"
    name = path.stem
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in study_dir.glob("*.yaml"))) or "none"
        raise ConfigError([f"study: no study {name!r} ({path} does not exist); known: {known}"])
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(values, dict):
        raise ConfigError([f"study: {path} must hold a mapping"])
    values.update(overrides or {})
    values["name"] = name
    spec, problems = build_typed(StudySpec, values)
    if problems:
        raise ConfigError([f"{path}: {problem}" for problem in problems])
    problems = study_problems(spec)
    if problems:
        raise ConfigError([f"{path}: {problem}" for problem in problems])
    return spec
