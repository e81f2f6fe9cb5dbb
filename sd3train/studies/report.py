"""A study's report: each arm's final metrics over its seeds, plots, and what is still missing.

    results = collect(plan)                  # every run's metrics.csv, done or not
    path = write_report(plan, results)       # <study root>/report.md, the PNGs and plots.json

The table lists, per arm, the mean and the spread (sample standard deviation; n = the seeds done)
of each metric's final value, the first metric ranking the arms. Only finished runs count there;
the section "Missing" lists every other job with its state. Plots (matplotlib, PNG):
  curves       each metric of the study's `curves` (val/loss by default) over optimizer steps, per
               arm the mean over seeds, the band from the lowest to the highest seed (val_loss.png)
  loss_per_t   the final validation loss at each of the fixed timesteps, per arm
  grids        each arm's end-of-run sample grid (its first finished seed)
  scaling      final validation loss against parameters and against training FLOPs, log-log,
               with the least-squares power law L = a * x^b of the arms' means
plots.json holds each plot's series, the numbers behind the pictures.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sd3train.durable import write_json_atomic, write_text_atomic
from sd3train.studies.plan import Job, StudyPlan, run_series
from sd3train.studies.spec import parse_claim

VALIDATION_LOSS = "val/loss"
_T_METRIC = re.compile(r"^val/loss_t(\d+\.\d+)$")


@dataclass
class RunResult:
    job: Job
    state: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    grid: Optional[Path] = None

    def final(self, metric: str) -> Optional[float]:
        if metric == "val/loss_interior":  # spec.DERIVED_METRICS
            values = [points[-1][1] for name, points in self.series.items()
                      if (match := _T_METRIC.match(name)) and 0.0 < float(match.group(1)) < 1.0]
            return statistics.fmean(values) if values else None
        points = self.series.get(metric)
        return points[-1][1] if points else None


def collect(plan: StudyPlan) -> list[RunResult]:
    results = []
    for job, state in plan.states().items():
        series = run_series(job.run_dir)
        grids = sorted((job.run_dir / "samples").glob("eval-step-*.png"),
                       key=lambda path: int(path.stem.rsplit("-", 1)[1]))
        results.append(RunResult(job, state, series, grids[-1] if grids else None))
    return results


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def arm_table(plan: StudyPlan, results: list[RunResult]) -> list[dict]:
    """One row per arm, in the study's order: seeds done, and per metric (mean, spread) or None."""
    rows = []
    for arm in plan.spec.arms:
        done = [r for r in results if r.job.arm == arm and r.state == "done"]
        row = {"arm": arm, "seeds": [r.job.seed for r in done], "metrics": {}}
        for metric in plan.spec.metrics:
            values = [v for v in (r.final(metric) for r in done) if v is not None and math.isfinite(v)]
            row["metrics"][metric] = _spread(values) if values else None
        rows.append(row)
    return rows


def ranked(plan: StudyPlan, rows: list[dict]) -> list[str]:
    """Arms with a value of the first metric, best first (lower is better unless rank_higher)."""
    first = plan.spec.metrics[0]
    scored = [row for row in rows if row["metrics"][first] is not None]
    scored.sort(key=lambda row: row["metrics"][first][0], reverse=plan.spec.rank_higher)
    return [row["arm"] for row in scored]


# ----------------------------------------------------------------------------------------- plots
def _mean_curve(runs: list[RunResult], metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps any run has `metric` at, and the mean, lowest and highest value of the runs there."""
    by_run = [dict(run.series.get(metric, [])) for run in runs]
    steps = sorted(set().union(*(set(points) for points in by_run)))
    values = [[points[step] for points in by_run if step in points] for step in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_series(plan: StudyPlan, results: list[RunResult]) -> dict[str, dict[str, dict]]:
    """Each plot's series per arm ({plot: {arm: {"x": [...], "y": [...], ...}}}), from the runs that
    have the data (finished or not for the curves; finished only for final values)."""
    arms = list(plan.spec.arms)
    series: dict[str, dict[str, dict]] = {}
    for metric in plan.spec.curves if "curves" in plan.spec.plots else []:
        name = curve_plot_name(metric)
        series[name] = {}
        for arm in arms:
            runs = [r for r in results if r.job.arm == arm and r.series.get(metric)]
            if runs:
                steps, mean, low, high = _mean_curve(runs, metric)
                series[name][arm] = {"x": steps, "y": mean, "low": low, "high": high, "seeds": len(runs),
                                     "metric": metric}
    if "loss_per_t" in plan.spec.plots:
        series["loss_per_t"] = {}
        for arm in arms:
            done = [r for r in results if r.job.arm == arm and r.state == "done"]
            ts = sorted({float(m.group(1)) for r in done for name in r.series if (m := _T_METRIC.match(name))})
            finals = {t: [v for v in (r.final(f"val/loss_t{t:.3f}") for r in done) if v is not None] for t in ts}
            if done and ts:
                series["loss_per_t"][arm] = {"x": ts, "y": [statistics.fmean(finals[t]) for t in ts], "seeds": len(done)}
    if "scaling" in plan.spec.plots:
        series["scaling"] = {}
        for arm in arms:
            done = [r for r in results if r.job.arm == arm and r.state == "done" and r.final(VALIDATION_LOSS) is not None]
            if done:
                params, flops = model_size(plan, arm)
                series["scaling"][arm] = {"params": params, "flops": flops,
                                          "y": statistics.fmean(r.final(VALIDATION_LOSS) for r in done)}
    return series


def curve_plot_name(metric: str) -> str:
    """The plot (and PNG) name of a curve: val/loss -> val_loss."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", metric).strip("_")


def model_size(plan: StudyPlan, arm: str) -> tuple[int, int]:
    """(parameters of the arm's denoiser, its training FLOPs over trainer.max_steps), from its config
    (the FLOPs count is MM-DiT's, sd3train/model/flops.py). Computed once per plan and arm."""
    if arm not in plan.model_sizes:
        plan.model_sizes[arm] = _model_size(plan, arm)
    return plan.model_sizes[arm]


def _model_size(plan: StudyPlan, arm: str) -> tuple[int, int]:
    import torch

    from sd3train.model.crossattn_dit import CrossAttentionDiT
    from sd3train.model.flops import training_step_flops
    from sd3train.model.mmdit import MMDiT
    from sd3train.studies.plan import job_config

    cfg = job_config(plan.spec, arm, plan.spec.seeds[0], plan.extra, plan.runs_dir)
    build = CrossAttentionDiT if cfg.model.architecture == "crossattn_dit" else MMDiT
    with torch.device("meta"):
        params = sum(p.numel() for p in build.from_config(cfg.model).parameters())
    side = cfg.data.resolution // 2 ** (len(cfg.vae.block_out_channels) - 1)
    text_tokens = cfg.text.clip_l.max_length + cfg.text.t5.max_length
    step = training_step_flops(cfg.model, cfg.data.batch_size, side, side, text_tokens)
    return params, step * cfg.trainer.max_steps


def power_law(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares line log y = log a + b log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    b = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)
    return math.exp(my - b * mx), b


def draw_plot(name: str, data: dict[str, dict], grids: dict[str, Path], title: str):
    """The matplotlib Figure of plot `name` from its series (one labelled line per arm)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if name == "grids":
        figure = Figure(figsize=(4 * max(1, len(grids)), 4.4))
        for index, (arm, path) in enumerate(grids.items()):
            from PIL import Image

            axis = figure.add_subplot(1, max(1, len(grids)), index + 1)
            axis.imshow(Image.open(path).convert("RGB"))
            axis.set_title(arm)
            axis.axis("off")
        figure.suptitle(f"{title}: end-of-run samples per arm")
        return figure
    if name == "scaling":
        figure = Figure(figsize=(11, 4.2))
        for index, (key, label) in enumerate((("params", "parameters"), ("flops", "training FLOPs"))):
            axis = figure.add_subplot(1, 2, index + 1)
            for arm, point in data.items():
                axis.plot([point[key]], [point["y"]], "o", label=arm)
            if len({p[key] for p in data.values()}) >= 2:  # a line needs two sizes
                xs, ys = [p[key] for p in data.values()], [p["y"] for p in data.values()]
                a, b = power_law(xs, ys)
                grid = [min(xs) * (max(xs) / min(xs)) ** (i / 50) for i in range(51)]
                axis.plot(grid, [a * x ** b for x in grid], "k--", label=f"fit: {a:.3g} x^{b:.3f}")
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel(label)
            axis.set_ylabel("final validation loss")
            axis.legend(fontsize=7)
        figure.suptitle(title)
        figure.tight_layout()
        return figure
    if name == "loss_per_t":  # the loss at t spans 10x (t = 0 cannot be predicted): each arm against the mean too
        figure = Figure(figsize=(12, 4.5))
        axis, relative = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
        axis.set_yscale("log")
        at_t: dict[float, list[float]] = {}
        for line in data.values():
            for t, y in zip(line["x"], line["y"]):
                at_t.setdefault(t, []).append(y)
        for arm, line in data.items():
            relative.plot(line["x"], [100 * (y / statistics.fmean(at_t[t]) - 1) for t, y in zip(line["x"], line["y"])],
                          marker="o", markersize=3, label=arm)
        relative.axhline(0, color="k", linewidth=0.5)
        relative.set_xlabel("timestep t (1 = noise)")
        relative.set_ylabel("% above the arms' mean at t")
        relative.grid(alpha=0.3)
    else:
        figure = Figure(figsize=(7, 4.5))
        axis = figure.add_subplot(1, 1, 1)
    for arm, line in data.items():
        axis.plot(line["x"], line["y"], marker="o", markersize=3, label=f"{arm} (n={line['seeds']})")
        if "low" in line:
            axis.fill_between(line["x"], line["low"], line["high"], alpha=0.2)
    curve = name != "loss_per_t"
    values = [y for line in data.values() for y in line["y"]]
    if curve and values and min(values) > 0 and max(values) > 100 * min(values):  # attention logits: 10 against 1e4
        axis.set_yscale("log")
    axis.set_xlabel("optimizer step" if curve else "timestep t (1 = noise)")
    axis.set_ylabel(next(iter(data.values()))["metric"] if curve else "final validation loss at t")
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return figure


# ---------------------------------------------------------------------------------------- report
def _cell(value: Optional[tuple[float, float]], n: int) -> str:
    if value is None:
        return "-"
    return f"{value[0]:.4f}" if n < 2 else f"{value[0]:.4f} ± {value[1]:.4f}"  # one seed: no spread


def better_higher(metric: str) -> bool:
    """eval/ scores are better higher; losses and other training metrics lower."""
    return metric.startswith("eval/")


def claim_line(claim: str, metric: str, rows: list[dict]) -> str:
    """'- A < B on metric: holds|does not hold (a ± s against b ± s)' for a claim of spec.expect."""
    first, second = parse_claim(claim)[0]
    values = {row["arm"]: row["metrics"][metric] for row in rows}
    a, b = values.get(first), values.get(second)
    if a is None or b is None:
        return f"- `{first}` better than `{second}` on {metric}: not known yet (an arm has no finished run)"
    holds = a[0] > b[0] if better_higher(metric) else a[0] < b[0]
    return (f"- `{first}` better than `{second}` on {metric} ({'higher' if better_higher(metric) else 'lower'}): "
            f"{'holds' if holds else '**does not hold**'} ({a[0]:.4f} ± {a[1]:.4f} against {b[0]:.4f} ± {b[1]:.4f})")


def render_markdown(plan: StudyPlan, results: list[RunResult], rows: list[dict], plots: list[str],
                    series: dict[str, dict[str, dict]]) -> str:
    spec = plan.spec
    order = ranked(plan, rows)
    lines = [f"# Study {spec.name}: {spec.title}", ""]
    if spec.paper:
        lines += [f"**What the paper found.** {spec.paper.strip()}", ""]
    total, done = len(results), sum(r.state == "done" for r in results)
    lines += [f"{done} of {total} runs finished ({len(spec.arms)} arms x seeds {spec.seeds}). "
              f"Values are the final value of each metric, mean ± sample standard deviation over the seeds "
              f"finished (n); arms ranked by {spec.metrics[0]} ({'higher' if spec.rank_higher else 'lower'} is better).", ""]
    header = ["rank", "arm", "n", *spec.metrics, "parameters"]
    if "scaling" in series:
        header += ["training FLOPs"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda row: order.index(row["arm"]) if row["arm"] in order else len(order)):
        rank = str(order.index(row["arm"]) + 1) if row["arm"] in order else "-"
        params, flops = model_size(plan, row["arm"])
        cells = [rank, row["arm"], str(len(row["seeds"])), *(_cell(row["metrics"][m], len(row["seeds"])) for m in spec.metrics), f"{params:,}"]
        if "scaling" in series:
            cells.append(f"{flops:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    if "scaling" in series and len({p["params"] for p in series["scaling"].values()}) >= 2:
        for key in ("params", "flops"):
            a, b = power_law([p[key] for p in series["scaling"].values()], [p["y"] for p in series["scaling"].values()])
            lines += ["", f"Power law over {key}: L = {a:.4g} * {key}^{b:.4f}."]
    if spec.expect:
        lines += ["", "## The paper's claims, checked", ""]
        lines += [claim_line(claim, metric, rows) for claim in spec.expect
                  for metric in (parse_claim(claim)[1] or spec.metrics)]
    if spec.notes:
        lines += ["", f"**Reading it.** {spec.notes.strip()}"]
    lines += ["", "## Arms", ""]
    lines += [f"- `{arm}`: {' '.join(overrides) or '(the base only)'}" for arm, overrides in spec.arms.items()]
    lines += ["", f"Every arm: `{' '.join(spec.base)}`" + (f", and from the command line `{' '.join(plan.extra)}`"
                                                          if plan.extra else "") + "."]
    missing = [r for r in results if r.state != "done"]
    lines += ["", "## Missing", ""]
    lines += [f"- `{r.job.run_name}`: {r.state}" for r in missing] or ["Nothing: every run finished."]
    if missing:
        lines += ["", "Run the same sd3train-study command again to run only these."]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({name}.png)" for name in plots]
    return "\n".join(lines) + "\n"


def write_report(plan: StudyPlan, results: list[RunResult]) -> Path:
    """report.md, one PNG per plot with data and plots.json in the study's folder; returns report.md."""
    root = plan.root
    root.mkdir(parents=True, exist_ok=True)
    rows = arm_table(plan, results)
    series = plot_series(plan, results)
    grids = {}
    for arm in plan.spec.arms:
        grid = next((r.grid for r in results if r.job.arm == arm and r.state == "done" and r.grid), None)
        if grid is not None:
            grids[arm] = grid
    written = []
    names = [curve_plot_name(m) for m in plan.spec.curves] if "curves" in plan.spec.plots else []
    names += [name for name in plan.spec.plots if name != "curves"]
    for name in names:
        data = series.get(name, {})
        if (name == "grids" and not grids) or (name != "grids" and not data):
            continue
        draw_plot(name, data, grids, f"{plan.spec.name}").savefig(root / f"{name}.png", dpi=110)
        written.append(name)
    series["grids"] = {arm: {"file": str(path)} for arm, path in grids.items()}
    write_json_atomic(root / "plots.json", {"study": plan.spec.name, "plots": series,
                                            "table": [{**row, "metrics": {m: v and list(v) for m, v in row["metrics"].items()}}
                                                      for row in rows]})
    report = root / "report.md"
    write_text_atomic(report, render_markdown(plan, results, rows, written, series))
    return report

