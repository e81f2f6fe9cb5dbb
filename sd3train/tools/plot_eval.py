"""Plot a run's evaluation over training: the compositional benchmark's score per category and the
validation loss, read from the run's metrics.csv (written by sd3train-train's loggers).

    python -m sd3train.tools.plot_eval runs/tiny_compose_cpu/main             # -> <run>/eval_curves.png
    python -m sd3train.tools.plot_eval runs/tiny_compose_cpu/main --out docs/tiny_compose_cpu_eval.png

Lightning logs the validation after optimizer step k, and the suite run there, at row step k - 1;
the plot's x axis is the optimizer step k. Other suite metrics in the file (eval/fid, eval/kid,
eval/clip_score) get a panel each.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

COMPOSITIONAL = "eval/compositional/"
VALIDATION_LOSS = "val/loss"
OTHER_METRICS = ("eval/fid", "eval/kid", "eval/clip_score")


def _plotted(name: str) -> bool:
    return name == VALIDATION_LOSS or name.startswith(COMPOSITIONAL) or name in OTHER_METRICS


def read_series(metrics_csv: Path, wanted: Callable[[str], bool] = _plotted) -> dict[str, list[tuple[int, float]]]:
    """Each `wanted` metric's (optimizer step, value) points from a Lightning metrics.csv, in step
    order (by default the metrics this tool plots)."""
    if not metrics_csv.is_file():
        raise FileNotFoundError(f"{metrics_csv} does not exist (is it a run directory of sd3train-train?)")
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with metrics_csv.open(newline="") as stream:
        for row in csv.DictReader(stream):
            step = int(row["step"]) + 1
            for name, value in row.items():
                if value and name not in ("step", "epoch") and wanted(name):
                    series[name][step] = float(value)  # a resumed run's repeated row: the later one
    return {name: sorted(points.items()) for name, points in series.items()}


def plot(series: dict[str, list[tuple[int, float]]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    categories = sorted(name for name in series if name.startswith(COMPOSITIONAL))
    others = [name for name in OTHER_METRICS if name in series]
    if not categories and VALIDATION_LOSS not in series:
        raise ValueError(f"nothing to plot: no {VALIDATION_LOSS} or {COMPOSITIONAL}* rows")
    panels = 1 + len(others)
    figure, axes = plt.subplots(1, panels, figsize=(7 + 4 * (panels - 1), 4.5), squeeze=False)
    scores = axes[0][0]
    for name in categories:
        steps, values = zip(*series[name])
        overall = name.endswith("/overall")
        scores.plot(steps, values, marker="o", markersize=3, linewidth=2.5 if overall else 1.2,
                    color="black" if overall else None, label=name.removeprefix(COMPOSITIONAL))
    scores.set_xlabel("optimizer step")
    scores.set_ylabel("compositional score (fraction of prompts satisfied)")
    scores.set_ylim(-0.02, 1.02)
    scores.grid(alpha=0.3)
    if VALIDATION_LOSS in series:
        loss_axis = scores.twinx()
        steps, values = zip(*series[VALIDATION_LOSS])
        loss_axis.plot(steps, values, color="grey", linestyle="--", linewidth=1.5, label="validation loss")
        loss_axis.set_ylabel("validation loss (dashed)")
        handles = scores.get_legend_handles_labels()
        extra = loss_axis.get_legend_handles_labels()
        scores.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="center right")
    elif categories:
        scores.legend(fontsize=8)
    for axis, name in zip(axes[0][1:], others):
        steps, values = zip(*series[name])
        axis.plot(steps, values, marker="o", markersize=3)
        axis.set_xlabel("optimizer step")
        axis.set_title(name)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def last_values(series: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    return {name: points[-1][1] for name, points in series.items() if points and not math.isnan(points[-1][1])}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (holding metrics.csv)")
    parser.add_argument("--out", type=Path, help="the PNG (default <run_dir>/eval_curves.png)")
    args = parser.parse_args(argv)
    series = read_series(args.run_dir / "metrics.csv")
    out = plot(series, args.out or args.run_dir / "eval_curves.png", str(args.run_dir))
    for name, value in last_values(series).items():
        print(f"{name} = {value:.4f} (step {series[name][-1][0]})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
