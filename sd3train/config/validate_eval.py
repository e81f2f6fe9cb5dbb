"""Checks of the `eval` group: the shapes world's evaluation, and the metric suite's settings and
local files (the Inception weights, the OpenCLIP folder, the FID/KID reference), so a missing file
fails when the config is composed, not after training."""

from __future__ import annotations

from sd3train.config.eval_schema import EVAL_SUITES, EvalConfig
from sd3train.config.schema import TEXT_ENCODER_NAMES
from sd3train.data.shapes import NEW_SHAPES
from sd3train.data.sources import missing_local_shards, resolve_shard_urls
from sd3train.paths import resolve_repo_path

# What an OpenCLIP model folder holds besides its weights (open_clip's "local-dir:" layout).
OPEN_CLIP_CONFIG = "open_clip_config.json"


def eval_problems(eval_cfg: EvalConfig, *, need_reference: bool = True) -> list[str]:
    """Every problem of `eval_cfg`; `need_reference=False` when the FID/KID reference is about to be
    computed (sd3train-eval save_reference_stats=PATH), so reference_stats may not exist yet."""
    problems: list[str] = []
    for name in ("samples_per_caption", "every_n_steps"):
        if getattr(eval_cfg, name) < 0:
            problems.append(f"eval.{name}: must be >= 0, got {getattr(eval_cfg, name)}")
    unknown_shapes = [shape for shape in eval_cfg.new_shapes if shape not in NEW_SHAPES]
    if unknown_shapes:
        problems.append(f"eval.new_shapes: {unknown_shapes} are not among the new shapes {list(NEW_SHAPES)} "
                        "(sd3train/data/shapes.py)")
    encoders = [name for name in eval_cfg.without_encoders if name not in TEXT_ENCODER_NAMES]
    if encoders:
        problems.append(f"eval.without_encoders: unknown encoder(s) {encoders}; expected some of {list(TEXT_ENCODER_NAMES)}")
    suite = list(eval_cfg.suite)
    unknown = [name for name in suite if name not in EVAL_SUITES]
    if unknown:
        problems.append(f"eval.suite: {unknown} are not metrics; choose from {list(EVAL_SUITES)}")
    if len(set(suite)) != len(suite):
        problems.append(f"eval.suite: {suite} names a metric twice")
    if eval_cfg.every_n_steps and not suite:
        problems.append(f"eval.every_n_steps: {eval_cfg.every_n_steps} but eval.suite is empty (nothing to measure)")
    for name, low in (("batch_size", 1), ("kid_subsets", 1), ("kid_subset_size", 2), ("prompts_per_category", 1)):
        if getattr(eval_cfg, name) < low:
            problems.append(f"eval.{name}: must be >= {low}, got {getattr(eval_cfg, name)}")
    if {"fid", "kid", "clip_score"} & set(suite) and eval_cfg.num_images < 2:
        problems.append(f"eval.num_images: must be >= 2 for fid, kid and clip_score, got {eval_cfg.num_images}")
    if {"fid", "kid"} & set(suite):
        problems.extend(inception_problems(eval_cfg))
        problems.extend(reference_problems(eval_cfg, need_reference))
    if "clip_score" in suite:
        problems.extend(clip_model_problems(eval_cfg))
    return problems


def inception_problems(eval_cfg: EvalConfig) -> list[str]:
    weights = eval_cfg.inception_weights
    if weights is None:
        return ["eval.inception_weights: fid and kid need the FID Inception-v3 weights file "
                "(pt_inception-2015-12-05-6726825d.pth); nothing is downloaded"]
    if not resolve_repo_path(weights).is_file():
        return [f"eval.inception_weights: {weights} does not exist"]
    return []


def reference_problems(eval_cfg: EvalConfig, need_reference: bool) -> list[str]:
    shards, stats = eval_cfg.reference_shards, eval_cfg.reference_stats
    if need_reference and (shards is None) == (stats is None):
        return ["eval.reference_shards / eval.reference_stats: fid and kid need exactly one reference: real "
                f"images as shards or saved statistics, got reference_shards={shards!r}, reference_stats={stats!r}"]
    if stats is not None and need_reference and not resolve_repo_path(stats).is_file():
        return [f"eval.reference_stats: {stats} does not exist (sd3train-eval save_reference_stats=PATH writes it)"]
    if shards is not None:
        try:
            urls = resolve_shard_urls(shards)
        except ValueError:
            return [f"eval.reference_shards: {shards!r} names no shards"]
        missing = missing_local_shards(urls)
        if missing:
            return [f"eval.reference_shards: {len(missing)} shard(s) do not exist, e.g. {missing[0]}"]
    return []


def clip_model_problems(eval_cfg: EvalConfig) -> list[str]:
    folder = eval_cfg.clip_model
    if folder is None:
        return ["eval.clip_model: clip_score needs an OpenCLIP model folder (open_clip_config.json and weights)"]
    if not (resolve_repo_path(folder) / OPEN_CLIP_CONFIG).is_file():
        return [f"eval.clip_model: {folder} is not an OpenCLIP model folder (no {OPEN_CLIP_CONFIG} in it)"]
    return []
