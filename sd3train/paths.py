"""Where relative asset paths in configs (shipped tokenizers, VAE weights, shards) start."""

from __future__ import annotations

from pathlib import Path

# The checkout holding pyproject.toml (the package is installed in editable mode).
REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_repo_path(path: str | Path) -> Path:
    """`path` itself when absolute, else relative to the repository root (not the working directory)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def run_dir_of(cfg) -> Path:
    """runs/<experiment>/<run name> of a TrainConfig: no timestamp, so a requeued job finds its checkpoints."""
    return Path(cfg.paths.runs_dir) / cfg.experiment_name / cfg.run_name
