"""Measure a checkpoint: FID, KID, CLIP score and the compositional benchmark (sd3train/eval/suite.py).

    sd3train-eval checkpoint=runs/tiny_compose_cpu/main/checkpoints/last suite='[compositional]'
    sd3train-eval checkpoint=... suite='[fid,kid,clip_score]' inception_weights=weights/pt_inception.pth \\
        reference_stats=ref/coco.pt clip_model=weights/CLIP-ViT-L-14
    sd3train-eval save_reference_stats=ref/shapes_val.pt reference_shards='data/compose/val-000000.tar' \\
        inception_weights=weights/pt_inception.pth          # the reference once; no checkpoint needed

Arguments are key=value, like Hydra overrides:
  checkpoint      a checkpoint written by sd3train-train (step directory, checkpoints/last or .ckpt)
  out             the JSON to write (default <run dir>/eval/<checkpoint name>.json); beside it the
                  scored images (<name>.png) and metrics.csv, and a W&B run when the run logged to W&B
  save_reference_stats   compute the FID/KID reference of reference_shards and save it here; with a
                  checkpoint, then evaluate against it
  suite, num_images, prompts_per_category, reference_shards, reference_stats, inception_weights,
  clip_model, kid_subset_size, kid_subsets, batch_size, seed, prompts
                  the eval.* settings (defaults: the checkpoint's own)
  num_steps, guidance_scale, shift, uncond, skip_layers, skip_layer_scale, skip_layer_start,
  skip_layer_stop override the run's diffusion.sampler settings (as sd3train-sample takes them)
  ema             sample with the EMA weights when the checkpoint has them (default true)
  device          cpu | cuda (default: cuda when available)

With the same checkpoint, settings and seeds it gives the numbers the in-training evaluation
logged (sd3train/lit/evaluation.py). The JSON is written whole or not at all.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from sd3train.cli import fail, parse_key_values
from sd3train.sample import SAMPLER_KEYS, sampler_settings

PROG = "sd3train-eval"
EVAL_KEYS = ("suite", "num_images", "prompts_per_category", "reference_shards", "reference_stats",
             "inception_weights", "clip_model", "kid_subset_size", "kid_subsets", "batch_size", "seed", "prompts")
ALLOWED = {"checkpoint", "out", "save_reference_stats", "ema", "device", *EVAL_KEYS, *SAMPLER_KEYS}


def _fail(message: str) -> None:
    fail(PROG, message)


def eval_settings(base: dict, args: dict):
    """The EvalConfig of `base` (a run's eval section) with the arguments' eval keys over it."""
    from sd3train.config.eval_schema import EvalConfig
    from sd3train.config.typed import ConfigError, build_typed

    values = {**base, **{key: args[key] for key in EVAL_KEYS if key in args}}
    eval_cfg, problems = build_typed(EvalConfig, values)
    if problems:
        _fail(str(ConfigError([problem if problem.startswith("eval.") else f"eval.{problem}" for problem in problems])))
    return eval_cfg


def save_reference(eval_cfg, path: Path, device: str) -> None:
    from sd3train.config.validate_eval import inception_problems
    from sd3train.eval.suite import MetricSuite, reference_from_shards

    problems = inception_problems(eval_cfg)
    if eval_cfg.reference_shards is None:
        problems.append("reference_shards: save_reference_stats needs the real images' shards")
    if problems:
        _fail("; ".join(problems))
    started = time.perf_counter()
    reference = reference_from_shards(eval_cfg.reference_shards, MetricSuite(eval_cfg, device).inception(),
                                      eval_cfg.batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    reference.save(path)
    print(f"wrote {path}: {reference.count} images ({time.perf_counter() - started:.0f} s)")


def default_out(checkpoint_path: Path) -> Path:
    from sd3train.sample import default_out_dir

    samples_dir = default_out_dir(checkpoint_path)  # <run dir>/samples/<checkpoint name>
    return samples_dir.parent.parent / "eval" / f"{samples_dir.name}.json"


def log_rows(cfg, out: Path, metrics: dict, step: int) -> None:
    """The metrics as a metrics.csv row beside the JSON, and to W&B when the run logged there."""
    from sd3train.lit.loggers import RunCSVLogger, RunWandbLogger, wandb_run_id

    loggers = [RunCSVLogger(out.parent)]
    if cfg.logger.wandb and cfg.logger.wandb_mode != "disabled":
        loggers.append(RunWandbLogger(project=cfg.logger.project, entity=cfg.logger.entity,
                                      name=f"{cfg.experiment_name}/{cfg.run_name}/eval", group=cfg.experiment_name,
                                      id=wandb_run_id(out.parent), resume="allow", save_dir=str(out.parent),
                                      mode=cfg.logger.wandb_mode, job_type="eval"))
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()
        logger.finalize("success")


def main(argv: list[str] | None = None) -> None:
    args = parse_key_values(argv, prog=PROG, allowed=ALLOWED)
    if "checkpoint" not in args and "save_reference_stats" not in args:
        _fail("checkpoint=... required (or save_reference_stats=PATH to compute a reference)")
    checkpoint_path = Path(args["checkpoint"]) if "checkpoint" in args else None
    if checkpoint_path is not None and not checkpoint_path.exists():
        _fail(f"checkpoint {checkpoint_path} does not exist")

    import torch

    from sd3train.checkpoint import CheckpointError
    from sd3train.checkpoint.training import read_training_checkpoint

    device = args.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = None
    if checkpoint_path is not None:
        try:
            checkpoint = read_training_checkpoint(checkpoint_path)
        except CheckpointError as error:
            _fail(str(error))
    if checkpoint is not None:
        checkpoint.config.diffusion.sampler = sampler_settings(checkpoint.config, args, _fail)
    eval_cfg = eval_settings(checkpoint.eval_settings if checkpoint else {}, args)
    if "save_reference_stats" in args:
        stats_path = Path(args["save_reference_stats"])
        save_reference(eval_cfg, stats_path, device)
        if checkpoint is None:
            return
        eval_cfg = dataclasses.replace(eval_cfg, reference_stats=str(stats_path.resolve()), reference_shards=None)
    evaluate(checkpoint, eval_cfg, args, device)


def evaluate(checkpoint, eval_cfg, args: dict, device: str) -> None:
    from sd3train.config.typed import ConfigError
    from sd3train.config.validate_eval import eval_problems
    from sd3train.eval.suite import MetricSuite, suite_plan
    from sd3train.lit.evaluation import sample_plan, write_suite_grid
    from sd3train.lit.restore import restore_module

    problems = eval_problems(eval_cfg) or ([] if eval_cfg.suite else ["eval.suite: empty; e.g. suite='[compositional]'"])
    if problems:
        _fail(str(ConfigError(problems)))
    started = time.perf_counter()
    plan = suite_plan(eval_cfg)
    suite = MetricSuite(eval_cfg, device)
    if {"fid", "kid"} & set(eval_cfg.suite):
        suite.reference()  # a bad reference fails before sampling
    module = restore_module(checkpoint).to(device)
    if not args.get("ema", True):
        module.ema = module.text_ema = None  # sample with the trained weights
    images = sample_plan(module, eval_cfg, plan)
    metrics = suite.measure(images, plan)
    out = Path(args["out"]) if "out" in args else default_out(checkpoint.path)
    step = checkpoint.step or 0
    grid = write_suite_grid(out.with_suffix(".png"), images)
    record = {"checkpoint": str(checkpoint.path), "step": step, "metrics": metrics,
              "settings": dataclasses.asdict(eval_cfg), "images": len(images), "first_seeds": plan.seeds[:1],
              "sampler": dataclasses.asdict(checkpoint.config.diffusion.sampler),
              "ema": bool(args.get("ema", True)), "device": device, "grid": grid.name,
              "seconds": round(time.perf_counter() - started, 1)}
    from sd3train.durable import write_json_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, record)
    log_rows(checkpoint.config, out, metrics, step)
    for name, value in metrics.items():
        print(f"{name} = {value:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
