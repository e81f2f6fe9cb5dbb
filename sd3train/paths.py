"""Where things are: the repository root that relative asset paths in configs (shipped tokenizers,
VAE weights, shards) start from, Hydra's config folder, and a run's directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

# The checkout holding pyproject.toml (the package is installed in editable mode).
REPO_ROOT = Path(__file__).resolve().parents[1]
# Hydra's config folder, absolute: Hydra resolves a relative one against the package when run as a
# console script.
CONF_DIR = REPO_ROOT / "conf"


def resolve_repo_path(path: str | Path) -> Path:
    """`path` itself when absolute, else relative to the repository root (not the working directory)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def run_dir_of(cfg) -> Path:
    """runs/<experiment>/<run name> of a TrainConfig: no timestamp, so a requeued job finds its checkpoints."""
    return Path(cfg.paths.runs_dir) / cfg.experiment_name / cfg.run_name


def sweep_run_name(run_name: str, job_number: int, overrides: list[str]) -> str:
    """A sweep job's run name: `<run_name>-<job number>-<digest of its overrides>`. The same for a
    requeued job (so it resumes), another for the same job number of a sweep over other values (so
    it never resumes a run it is not)."""
    digest = hashlib.sha256("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
    return f"{run_name}-{job_number}-{digest}"
